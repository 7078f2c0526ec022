"""The live status of `serve`: /metrics (parsed with prometheus-client), /status, /healthz, and logs."""

from __future__ import annotations

import errno
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import PCI_IDS_PATH
from prometheus_client.parser import text_string_to_metric_families

from deviceplugin.cli import build_parser
from deviceplugin.config import Config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.sim.kubelet import FakeKubelet
from deviceplugin.sim.node import gpu
from deviceplugin.status import Limits, StatusServer

R = "nvidia.com/GA104"


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    shown = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{shown}:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def status(harness):
    harness.node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    harness.node.add_all(gpu("0000:02:00.0", "2484", "228b", "14"))
    server = StatusServer(harness.daemon, 0, host="127.0.0.1")
    server.start()
    harness.start()
    assert harness.kubelet.wait_for(lambda k: k.allocatable().get(R) == 2, 10)
    # the kubelet streams devices before its Register call returns: wait for the plugin's side too
    deadline = time.monotonic() + 10
    while not harness.daemon.health()[0]:
        assert time.monotonic() < deadline, f"the plugin never recorded its registrations: {harness.daemon.health()[1]}"
        time.sleep(0.01)
    try:
        yield harness, server.port
    finally:
        server.stop()


def test_metrics(status):
    harness, port = status
    harness.kubelet.allocate(R, "0000:01:00.0")
    with pytest.raises(grpc.RpcError):
        harness.kubelet.allocate(R, "0000:09:00.0")
    code, text = get(port, "/metrics")
    assert code == 200
    m = samples(text)
    assert m[("vfio_device_plugin_devices", (("health", "Healthy"), ("resource", R)))] == 2
    assert m[("vfio_device_plugin_devices", (("health", "Unhealthy"), ("resource", R)))] == 0
    assert m[("vfio_device_plugin_allocations_total", (("resource", R),))] == 1
    assert m[("vfio_device_plugin_allocation_errors_total", (("reason", "unknown_device"), ("resource", R)))] == 1
    assert m[("vfio_device_plugin_registrations_total", (("resource", R),))] >= 1
    assert m[("vfio_device_plugin_rescans_total", ())] >= 1
    assert m[("vfio_device_plugin_last_rescan_timestamp_seconds", ())] > time.time() - 60
    assert ("vfio_device_plugin_rescan_duration_seconds", ()) in m


def test_status_document(status):
    harness, port = status
    harness.kubelet.allocate(R, "0000:02:00.0")
    code, body = get(port, "/status")
    assert code == 200
    doc = json.loads(body)
    assert doc["resources"] == {R: ["0000:01:00.0", "0000:02:00.0"], R + "_AUDIO": ["0000:01:00.1", "0000:02:00.1"]}
    reg = doc["registration"][R]
    assert reg["registered"] is True and reg["since"] > 0 and reg["socket"].endswith("vfio-dp-nvidia.com_GA104.sock")
    devices = {d["id"]: d for d in reg["devices"]}
    assert devices["0000:02:00.0"]["last_allocate"]["resource"] == R
    assert devices["0000:01:00.0"]["last_allocate"] is None
    assert get(port, "/nope")[0] == 404


def test_healthz_flips_when_the_registration_is_lost(status):
    harness, port = status
    assert get(port, "/healthz") == (200, "ok\n")
    harness.kubelet.reject[R] = "plugin refused for the test"
    harness.kubelet.restart()
    deadline = time.monotonic() + 10
    while get(port, "/healthz")[0] != 503:
        assert time.monotonic() < deadline, "healthz never turned 503"
        time.sleep(0.02)
    code, body = get(port, "/healthz")
    assert code == 503 and R in body and "not registered" in body
    harness.kubelet.reject.clear()
    harness.daemon.frontend.registrar.retry_now()
    deadline = time.monotonic() + 10
    while get(port, "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "healthz never recovered"
        time.sleep(0.02)


def test_serve_with_status_port_and_json_logs(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    kubelet = FakeKubelet(str(node.plugins)).start()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deviceplugin",
            "serve",
            "--status-port",
            "0",
            "--log-format",
            "json",
            "--rescan-interval",
            "0.2",
            *node.cli_args(PCI_IDS_PATH),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[dict] = []
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 20
        while port is None or not any("registered nvidia.com/GA104" in line["msg"] for line in lines):
            assert time.monotonic() < deadline, lines
            lines.append(json.loads(proc.stderr.readline()))
            m = re.search(r"status endpoint on port (\d+)", lines[-1]["msg"])
            port = int(m.group(1)) if m else port
        while get(port, "/healthz")[0] != 200:  # the audio companion registers a moment later
            assert time.monotonic() < deadline, get(port, "/healthz")
            time.sleep(0.02)
        (node.dev / "vfio" / "13").unlink()
        while not any("unhealthy" in line["msg"] for line in lines):
            assert time.monotonic() < deadline, lines
            lines.append(json.loads(proc.stderr.readline()))
        change = next(line for line in lines if "unhealthy" in line["msg"])
        assert change["level"] == "warning"
        assert change["msg"].startswith("group 13 (0000:01:00.0 10de:2484) of nvidia.com/GA104 unhealthy: /dev/vfio/13 is missing")
        assert not any("Allocate" in line["msg"] for line in lines)  # no line per RPC
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        kubelet.stop()


def test_healthz_is_503_while_a_socket_cannot_be_served(node, pci_ids):
    """As on an SELinux node that denies the bind: the log says so, and the pod must not be Ready."""
    from conftest import Harness, wait

    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    blocker = node.plugins / "vfio-dp-nvidia.com_GA104.sock"
    blocker.mkdir()  # a path the plugin can neither remove nor bind: its server cannot start
    h = Harness(node, pci_ids)
    server = StatusServer(h.daemon, 0, host="127.0.0.1")
    server.start()
    try:
        h.start()
        wait(lambda: "not served" in get(server.port, "/healthz")[1], 10, lambda: get(server.port, "/healthz"))
        code, body = get(server.port, "/healthz")
        assert code == 503 and f"{R}: not served (cannot serve {blocker}" in body
        blocker.rmdir()  # the next rescan serves it, registers it, and the pod turns Ready
        wait(lambda: get(server.port, "/healthz")[0] == 200, 10, lambda: get(server.port, "/healthz"))
        assert h.kubelet.wait_for(lambda k: k.allocatable().get(R) == 1, 5)
    finally:
        server.stop()
        h.close()


# --- where it listens -----------------------------------------------------------------------------
@pytest.fixture
def idle_daemon(node, pci_ids):
    """A daemon that never started: /healthz answers 503 ("starting"), which is all these tests need."""
    return Daemon(Options(str(node.sys), str(node.dev), str(node.proc), str(node.plugins)), Config(), pci_ids)


@pytest.fixture
def serving():
    servers: list[StatusServer] = []

    def start(server: StatusServer) -> StatusServer:
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@needs_ipv6
def test_by_default_the_probes_reach_it_over_ipv6_and_ipv4(idle_daemon, serving):
    """IPv6 single-stack clusters probe the pod's IPv6 address: an IPv4-only socket refused them."""
    server = serving(StatusServer(idle_daemon, 0))
    for host in ("::1", "127.0.0.1"):
        code, body = get(server.port, "/healthz", host)
        assert (code, body) == (503, "starting: the first scan of the node has not finished\n"), host


def test_a_host_without_ipv6_falls_back_to_ipv4(idle_daemon, serving, monkeypatch):
    class NoIPv6(socket.socket):
        def __init__(self, family: int = -1, *args, **kwargs) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(socket, "socket", NoIPv6)
        server = StatusServer(idle_daemon, 0)
    assert server.address == "0.0.0.0"
    assert get(serving(server).port, "/healthz")[0] == 503


@needs_ipv6
def test_status_address_listens_on_that_address_only(idle_daemon, serving):
    v6 = serving(StatusServer(idle_daemon, 0, "::1"))
    assert get(v6.port, "/healthz", "::1")[0] == 503 and refused("127.0.0.1", v6.port)
    v4 = serving(StatusServer(idle_daemon, 0, "127.0.0.1"))
    assert get(v4.port, "/healthz")[0] == 503 and refused("::1", v4.port)


def test_status_address_option_and_its_variable(monkeypatch):
    assert build_parser().parse_args(["serve"]).status_address == ""
    monkeypatch.setenv("VFIO_DP_STATUS_ADDRESS", "::1")
    assert build_parser().parse_args(["serve"]).status_address == "::1"
    assert build_parser().parse_args(["serve", "--status-address", "0.0.0.0"]).status_address == "0.0.0.0"


# --- clients that misuse it: deadlines, header limits, a cap on connections --------------------------
def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def hung_up(conn: socket.socket, wait: float = 0.0) -> bool:
    """Whether the server closed the connection (EOF or reset), waiting up to `wait` seconds."""
    if not select.select([conn], [], [], wait)[0]:
        return False
    try:
        return conn.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def answer(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_sending_headers_forever_is_cut_off_at_the_deadline(idle_daemon, serving):
    server = serving(StatusServer(idle_daemon, 0, "127.0.0.1", Limits(request_timeout=0.5)))
    with connect(server.port) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        try:
            while not hung_up(conn, 0.05):  # a short header every 50 ms: each byte is in time, the whole never
                assert time.monotonic() - t0 < 3, "the server still listens to a request that never ends"
                conn.sendall(b"X-Slow: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert time.monotonic() - t0 < 1.5


def test_request_heads_beyond_the_limits_are_refused(idle_daemon, serving):
    server = serving(StatusServer(idle_daemon, 0, "127.0.0.1"))
    with connect(server.port) as conn:  # 40 headers: more than 32, but well under http.server's 100
        conn.sendall(b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n")
        assert answer(conn).startswith(b"HTTP/1.0 431 ")
    with connect(server.port) as conn:  # one 16 KiB header: under http.server's 64 KiB line
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n")
            assert answer(conn).startswith(b"HTTP/1.0 431 ")
        except ConnectionResetError:
            pass  # it hung up with the rest of the header unread: a reset, which is refusal enough
    assert get(server.port, "/healthz")[0] == 503  # and an ordinary request still gets its answer


def test_idle_connections_beyond_the_cap_take_no_threads_and_healthz_answers(idle_daemon, serving):
    server = serving(StatusServer(idle_daemon, 0, "127.0.0.1", Limits(max_connections=4)))
    threads = threading.active_count()
    idle = [connect(server.port) for _ in range(50)]  # connect, send nothing
    try:
        deadline = time.monotonic() + 5
        while sum(hung_up(c) for c in idle) < 46 or threading.active_count() > threads + 4:
            assert time.monotonic() < deadline, (
                f"{sum(hung_up(c) for c in idle)} of 50 idle connections closed, threads {threading.active_count() - threads:+d}"
            )
            time.sleep(0.01)
        assert not any(hung_up(c) for c in idle[-4:])  # the oldest were pushed out, the four newest wait
        assert get(server.port, "/healthz")[0] == 503  # a probe still gets in: it pushes out the oldest idle one
    finally:
        for c in idle:
            c.close()


def test_when_every_connection_is_busy_answering_a_new_one_is_closed_at_once(idle_daemon, serving):
    release = threading.Event()
    idle_daemon.health = lambda: (release.wait(5), (True, "ok"))[1]  # answers only once released
    server = serving(StatusServer(idle_daemon, 0, "127.0.0.1", Limits(max_connections=2)))
    busy = [connect(server.port) for _ in range(2)]
    try:
        for conn in busy:
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + 5
        while server.httpd.answering() < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        threads = threading.active_count()
        with connect(server.port) as extra:
            assert hung_up(extra, 2)
        assert threading.active_count() == threads
        release.set()
        assert [answer(c).split(b"\r\n", 1)[0] for c in busy] == [b"HTTP/1.0 200 OK"] * 2
    finally:
        release.set()
        for c in busy:
            c.close()
