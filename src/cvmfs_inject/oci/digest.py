"""Digests: the one definition of what a usable digest is, and how to compute one.

The spec's grammar (`algorithm:encoded`) admits algorithms nobody verifies; we accept the
two the OCI image-spec registers, sha256 and sha512, in lowercase hex of the right length.
`digest_problem` says why a string is not such a digest (for `validate`, which reports);
`check_digest` raises the same sentence as an InputError (for code that must stop).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci.jsondoc import json_type, shorten

# the image-spec's digest grammar, and its two registered algorithms
GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
HEX_LENGTH = {"sha256": 64, "sha512": 128}
VALID = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")


def digest_problem(digest: Any) -> str | None:
    """Why `digest` is not a usable digest, or None if it is."""
    if not isinstance(digest, str):
        return f"digest must be a string, not {json_type(digest)}"
    if VALID.match(digest):
        return None
    shown = shorten(repr(digest), 90)
    if not GRAMMAR.fullmatch(digest):
        return f"invalid digest {shown}: expected <algorithm>:<encoded>"
    algorithm, _, encoded = digest.partition(":")
    length = HEX_LENGTH.get(algorithm)
    if length is None:
        return f"unsupported digest algorithm {algorithm!r} in {shown}: use sha256 or sha512"
    if not re.fullmatch(r"[0-9a-fA-F]+", encoded):
        return f"invalid digest {shown}: {algorithm} needs {length} lowercase hex characters"
    if encoded != encoded.lower():
        return f"invalid digest {shown}: {algorithm} encoding must be lowercase hex"
    return (f"invalid digest {shown}: {algorithm} needs {length} lowercase hex characters, "
            f"got {len(encoded)}")


def check_digest(digest: Any) -> str:
    """Return `digest` if it is usable; raise InputError saying why not otherwise."""
    problem = digest_problem(digest)
    if problem is not None:
        raise InputError(problem)
    return str(digest)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
