"""JSON as image documents need it: canonical bytes to write, strict objects to read."""

from __future__ import annotations

import json
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
    return doc


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ("an object", "null")."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def shorten(text: str, limit: int) -> str:
    """Keep messages to one readable line even when they quote a large value."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 1] + "…"
