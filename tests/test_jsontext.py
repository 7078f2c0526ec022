"""`jsontext.dumps` writes exactly what `json.dumps(doc, indent=2)` writes: on real documents (non-ASCII
pci.ids names included) and on any document hypothesis can think of, odd types and values included."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from deviceplugin.jsontext import dumps
from deviceplugin.sim.node import Fn, gpu

# Names as pci.ids has them: Cyrillic, a registered sign, a zero-width non-joiner, a quote and a backslash.
ODD_PCI_IDS = (
    "10de  NVIDIA Corporation\n"
    "\t2484  GA104 [GeForce RTX 3070]\n"
    "\t228b  GA104 High Definition Audio Controller\n"
    "\t2335  GH100 [H200 SXM 141GB]\n"
    "1c5c  SK hynix\n"
    "\tc935  82С935 [MachOne] Integrated PCI Audio Processor\n"
    "1d6a  Aquantia Corp.\n"
    '\t2b42  88W8997 Wi-Fi® 5 (802.11ac) + "Bluetooth®" \\ 5.3\n'
    "1e3b  Cloud\n"
    "\t2a32  Cloud Storage Accelerator\u200c\n"
)


class Color(enum.IntEnum):
    RED = 1


def test_inspect_json_is_what_json_dumps_writes_non_ascii_names_included(node):
    pci_ids = node.root / "pci.ids"
    pci_ids.write_text(ODD_PCI_IDS, encoding="utf-8")
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0))
    node.add_all(
        [
            Fn("0000:02:00.0", "1c5c", "c935", "040300", "snd_hda_intel", "14"),
            Fn("0000:03:00.0", "1d6a", "2b42", "028000", "mwifiex", "15"),
            Fn("0000:04:00.0", "1e3b", "2a32", "030200", "vfio-pci", "16"),
            Fn("0000:05:00.0", "10de", "2335", "030200", "vfio-pci", "17"),
        ]
    )
    out = subprocess.run(
        [sys.executable, "-m", "deviceplugin", "inspect", "--json", *node.cli_args(pci_ids), f"--kubelet-plugins-dir={node.root}/p"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    doc = json.loads(out)
    assert out == json.dumps(doc, indent=2) + "\n"
    assert "\\u0421" in out and "\\u00ae" in out and "\\u200c" in out  # escaped as the standard library escapes them
    names = {fn["name"] for g in doc["groups"] for fn in g["functions"]}
    assert "82С935 [MachOne] Integrated PCI Audio Processor" in names
    assert {d["resource"] for d in doc["dra"]["published"]} >= {"nvidia.com/GH100"}


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.sampled_from(["", "\x00\x1f\x7f\ud800", "é€𝄞", '"\\/\n\t\r\b\f', "{[,]}: "])
)
keys = st.text() | st.sampled_from(["", "a", "é", '"'])
odd_keys = keys | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.lists(children, max_size=5).map(tuple) | st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=40,
)
odd_documents = st.recursive(
    scalars | st.sampled_from([Color.RED, OrderedDict(a=1), type("S", (str,), {})("sub")]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(odd_keys, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_any_plain_document(doc):
    assert dumps(doc) == json.dumps(doc, indent=2)


@settings(max_examples=200, deadline=None)
@given(odd_documents)
def test_documents_with_odd_types_and_keys(doc):
    assert dumps(doc) == json.dumps(doc, indent=2)


def test_what_the_standard_library_refuses_is_refused_the_same_way():
    cycle: list[object] = []
    cycle.append(cycle)
    for doc in (cycle, {"a": object()}, {(1, 2): 1}):
        try:
            json.dumps(doc, indent=2)
        except (TypeError, ValueError) as exc:
            expected = type(exc)
        try:
            dumps(doc)
        except expected:
            continue
        raise AssertionError(f"{doc!r} was not refused with {expected.__name__}")
