"""JSON as image documents need it: canonical bytes to write, strict objects to read."""

from __future__ import annotations

import json
import re
from typing import Any

from cvmfs_inject.errors import InputError

# Documents (indexes, manifests, configs) are read whole; one larger than this is not one.
MAX_DOCUMENT = 64 << 20


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted UTF-8 JSON: the same document always gives the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: invalid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{where}: invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    problem = lone_surrogate(data, doc)
    if problem is not None:
        raise InputError(f"{where}: invalid JSON: {problem}")
    return doc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(data: bytes, doc: Any) -> str | None:
    """What is wrong when a string of `doc` holds an unpaired UTF-16 surrogate escape
    (`"\\udcff"`): Python reads it, but it is no text (RFC 8259 leaves it undefined, I-JSON
    forbids it) and could not be written back as UTF-8. None when every string is text."""
    if not _SURROGATE_ESCAPE.search(data):
        return None
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"the string {shorten(repr(value), 60)} holds an unpaired UTF-16 "
                        f"surrogate (\\u{ord(value[exc.start]):04x}), which is not text")
    return None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ("an object", "null")."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def shorten(text: str, limit: int) -> str:
    """Keep messages to one readable line even when they quote a large value."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 1] + "…"
