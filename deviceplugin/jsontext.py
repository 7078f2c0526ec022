"""`json.dumps(doc, indent=2)`, the same text in less than half the time.

With `indent`, the standard library cannot use its C encoder and falls back to a pure-Python one whose
nested generators hand every piece of text up through every level of the document; on 4,096 functions
that was half of `inspect --json`. `dumps` writes the plain types a document is made of (dict, list,
tuple, str, int, bool, None, finite float, each of exactly that type) into one list of pieces, joined
once, and encodes strings with the same C function the standard library uses (ensure_ascii). Anything
else (a subclass, a non-string key, NaN, a cycle) goes to `json.dumps(doc, indent=2)` as a whole, so
the text is byte-identical for every input; tests/test_jsontext.py compares the two.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _encode
from typing import Any

_INF = float("inf")


class _Unusual(Exception):
    """A value outside the plain types: the standard library encodes the whole document."""


def dumps(doc: Any) -> str:
    """Exactly `json.dumps(doc, indent=2)`."""
    pieces: list[str] = []
    try:
        _write(doc, "\n", pieces.append, {})
    except (_Unusual, RecursionError):
        return json.dumps(doc, indent=2)
    return "".join(pieces)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    cls = v.__class__
    if cls is int:
        return int.__repr__(v)
    if cls is float and -_INF < v < _INF:
        return float.__repr__(v)
    raise _Unusual


def _write(o: Any, nl: str, write: Callable[[str], None], keys: dict[str, str]) -> None:
    """Writes `o` at the indent `nl` (a newline and the spaces of its level); `keys` caches '"key": '."""
    cls = o.__class__
    if cls is dict:
        if not o:
            write("{}")
            return
        inner = nl + "  "
        sep = "{" + inner
        for k, v in o.items():
            prefix = keys.get(k)
            if prefix is None:
                if k.__class__ is not str:
                    raise _Unusual
                prefix = keys[k] = _encode(k) + ": "
            c = v.__class__
            if c is str:
                write(sep + prefix + _encode(v))
            elif c is dict or c is list or c is tuple:
                write(sep + prefix)
                _write(v, inner, write, keys)
            else:
                write(sep + prefix + _scalar(v))
            sep = "," + inner
        write(nl + "}")
    elif cls is list or cls is tuple:
        if not o:
            write("[]")
            return
        inner = nl + "  "
        sep = "[" + inner
        for v in o:
            c = v.__class__
            if c is str:
                write(sep + _encode(v))
            elif c is dict or c is list or c is tuple:
                write(sep)
                _write(v, inner, write, keys)
            else:
                write(sep + _scalar(v))
            sep = "," + inner
        write(nl + "]")
    elif cls is str:
        write(_encode(o))
    else:
        write(_scalar(o))
