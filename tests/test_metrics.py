"""The Recorder keeps its values in plain dictionaries and imports prometheus_client only to be read.

tests/fixtures/metrics.txt is what the library's own Counter and Gauge objects exposed for the calls
below (written with the Recorder of c46311d, time frozen): the exposition must stay that text.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from deviceplugin.metrics import Recorder

GOLDEN = Path(__file__).parent / "fixtures" / "metrics.txt"
R, AUDIO = "nvidia.com/GA104", "nvidia.com/GA104_AUDIO"


def every_call(r: Recorder) -> Recorder:
    r.rescanned(0.0125)
    r.rescanned(0.004)
    r.set_devices({R: (2, 1), AUDIO: (2, 0)})
    r.allocated(R, ["0000:01:00.0"])
    r.allocated(R, ["0000:02:00.0"])
    r.allocated(AUDIO, ["0000:01:00.1"])
    r.allocation_failed(R, "unknown_device")
    r.allocation_failed(R, "unavailable")
    r.allocation_failed(R, "unknown_device")
    r.registration(R, True)
    r.registration(R, False)
    r.registration(AUDIO, False)
    r.set_allocations(False, {R: {"0000:01:00.0": True}})
    r.set_allocations(True, {R: {"0000:01:00.0": True, "0000:02:00.0": False}, AUDIO: {"0000:01:00.1": True}})
    r.set_allocations(True, {R: {"0000:02:00.0": True}})
    r.set_companions({(AUDIO, "audio"): 2})
    r.set_companions({(AUDIO, "audio"): 1, ("nvidia.com/GA104_USB", "usb"): 0})
    r.dra_published(3, 1)
    r.dra_prepared({"pci-0000-01-00-0": ["a", "b"]})
    r.dra_prepared({"pci-0000-02-00-0": ["c"]})
    r.dra_prepare(True)
    r.dra_prepare(False)
    r.dra_prepare(True)
    r.dra_slice_write("create")
    r.dra_slice_write("update")
    r.dra_slice_write("create")
    r.dra_slice_error()
    return r


def test_the_exposition_is_what_the_librarys_counters_and_gauges_wrote(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1700000000.25)
    r = every_call(Recorder())
    assert r.exposition().decode() == GOLDEN.read_text()
    assert r.rescan_count == 2
    assert r.registry.get_sample_value("vfio_device_allocated", {"resource": R, "device": "0000:02:00.0"}) == 1
    assert r.registry.get_sample_value("vfio_device_allocated", {"resource": R, "device": "0000:01:00.0"}) is None  # cleared
    assert r.last_allocations()["0000:01:00.1"] == {"resource": AUDIO, "time": 1700000000.25}


def test_recording_does_not_import_prometheus_client():
    code = (
        "import sys\nfrom deviceplugin.metrics import Recorder\nr = Recorder()\n"
        "r.rescanned(0.1); r.allocated('a/b', ['x']); r.set_allocations(True, {'a/b': {'x': True}})\n"
        "assert r.rescan_count == 1\n"
        "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))\n"
        "r.exposition()\nprint('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]
