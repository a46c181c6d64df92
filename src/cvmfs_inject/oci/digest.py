"""Digests: which a document may carry, which we can verify, and how to compute one.

Two questions, one definition each:

- *Is this a digest an OCI document may carry?* (`digest_problem`, for `validate`, which
  reports.) The image-spec's grammar, `algorithm:encoded`, plus the encoding of the two
  algorithms it registers (sha256 = 64 and sha512 = 128 lowercase hex). Any other algorithm
  that fits the grammar is valid: the spec says unsupported digests SHOULD pass validation
  (its own examples are `multihash+base58:…` and `sha256+b64u:…`).
- *Can we verify content against it?* (`verify_problem`; `check_digest` raises it, `VALID`
  matches it.) Only sha256 and sha512, because every blob path, registry request and hash
  the tool makes must check the bytes it names.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci.jsondoc import json_type, shorten

# the image-spec's digest grammar, and its registered algorithms with their hex lengths
GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
REGISTERED = {"sha256": 64, "sha512": 128}
VALID = re.compile(
    "^(?:" + "|".join(f"{alg}:[a-f0-9]{{{n}}}" for alg, n in REGISTERED.items()) + r")\Z")


def digest_problem(digest: Any) -> str | None:
    """Why `digest` may not appear in an OCI document, or None if it may."""
    if not isinstance(digest, str):
        return f"digest must be a string, not {json_type(digest)}"
    if VALID.match(digest):
        return None
    shown = shorten(repr(digest), 90)
    if not GRAMMAR.fullmatch(digest):
        return f"invalid digest {shown}: expected <algorithm>:<encoded>"
    algorithm, _, encoded = digest.partition(":")
    length = REGISTERED.get(algorithm)
    if length is None:
        return None  # valid, though nobody here can verify it: see verify_problem
    if not re.fullmatch(r"[0-9a-fA-F]+", encoded):
        return f"invalid digest {shown}: {algorithm} needs {length} lowercase hex characters"
    if encoded != encoded.lower():
        return f"invalid digest {shown}: {algorithm} encoding must be lowercase hex"
    return (f"invalid digest {shown}: {algorithm} needs {length} lowercase hex characters, "
            f"got {len(encoded)}")


def verify_problem(digest: Any) -> str | None:
    """Why content cannot be verified against `digest`, or None if it can: the digest is
    invalid, or valid with an algorithm the spec does not register (we have no hash that
    could match it)."""
    problem = digest_problem(digest)
    if problem is not None or VALID.match(digest):
        return problem
    algorithm = digest.partition(":")[0]
    return (f"cannot verify {shorten(digest, 160)}: unsupported digest algorithm "
            f"{algorithm!r} (only {' and '.join(REGISTERED)} can be verified)")


def check_digest(digest: Any) -> str:
    """Return `digest` if content can be verified against it; raise InputError why not."""
    problem = verify_problem(digest)
    if problem is not None:
        raise InputError(problem)
    return str(digest)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
