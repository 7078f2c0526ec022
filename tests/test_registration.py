"""The Registrar against the test kubelet over real sockets: one Register per served socket and kubelet instance."""

from __future__ import annotations

from conftest import wait
from test_sim_kubelet import Plugin, R, serve

from deviceplugin.registration import Registrar
from deviceplugin.sim.kubelet import FakeKubelet


def test_a_request_repeated_while_its_register_is_in_flight_registers_once(node):
    plugin_dir = str(node.plugins)
    kubelet = FakeKubelet(plugin_dir).start()
    plugin = Plugin(stall=True)
    server = serve(plugin_dir, "p.sock", plugin)
    results: list[str | None] = []
    registrar = Registrar(plugin_dir, lambda resource, endpoint, error: results.append(error), backoff=(0.05,))
    registrar.start()
    try:
        registrar.request(R, "p.sock", 1)
        assert plugin.dialled.wait(10)  # the Register is in flight: the kubelet is dialling back
        registrar.request(R, "p.sock", 1)  # the next event of the same kubelet restart asks again
        plugin.release.set()
        assert wait(lambda: results == [None])
        registrar.request(R, "p.sock", 1)  # and a timer tick after it succeeded
        assert registrar.pending() == [] and list(registrar.registered()) == [R]
        assert [r.generation for r in kubelet.registrations] == [1]

        kubelet.stop()  # a new kubelet instance; our socket survives
        assert registrar.registered() == {}
        kubelet.start()
        registrar.request(R, "p.sock", 1)
        registrar.request(R, "p.sock", 1)
        assert wait(lambda: list(registrar.registered()) == [R])
        registrar.request(R, "p.sock", 2)  # a new start of our server needs its own Register
        assert wait(lambda: len(kubelet.registrations) == 3 and not registrar.pending())
        assert [r.generation for r in kubelet.registrations] == [1, 2, 2]
        assert results == [None, None, None]
    finally:
        plugin.release.set()
        registrar.stop()
        server.stop(0)
        kubelet.stop()
