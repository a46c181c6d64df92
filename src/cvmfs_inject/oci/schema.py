"""Check OCI and Docker image JSON documents: our JSON Schemas plus the rules a schema can't say.

The schemas (in ``schemas/`` of the source tree, ``cvmfs_inject/_schemas`` in a wheel) are our
own, draft 2020-12, one self-contained file per document type, so nothing is fetched or resolved
across files at run time. On OCI documents they give the verdicts of the official image-spec
v1.1.1 schemas, formats included (``uri``, ``date-time``: asserted by ``oci.formats``), and add
only what the spec's text requires. What JSON Schema cannot express lives here: the encoding
of registered digest algorithms, embedded ``data`` matching its descriptor, unique annotation
keys and ``KEY=value`` environment entries. Docker v2s2 documents keep their own rules
(formats are annotations, and only sha256 and sha512 digests are accepted).

Every finding is a :class:`Problem` rather than an exception, so ``validate`` can report all of
them at once; only a misuse of the API (an unknown kind, a broken installation) raises.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci.digest import digest_problem, verify_problem
from cvmfs_inject.oci.formats import format_checker
from cvmfs_inject.oci.jsondoc import json_type, lone_surrogate, shorten
from cvmfs_inject.oci.media import MediaType

if TYPE_CHECKING:
    from jsonschema import ValidationError

KINDS = ("layout", "index", "manifest", "config", "descriptor")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# JSON strings (skipped whole, escapes included) or the non-JSON constants Python would accept.
_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*"|-?Infinity|NaN', re.DOTALL)
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class Problem:
    """One finding, printable as one line: where it is, then what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def detect_kind(doc: dict[str, Any]) -> str | None:
    """Guess the kind of a parsed document, or None; mediaType wins, then the shape decides.

    A descriptor comes first: its mediaType names its target (often a manifest), and unlike
    manifests and indexes it never has a schemaVersion.
    """
    if "schemaVersion" not in doc and {"digest", "size", "mediaType"} <= doc.keys():
        return "descriptor"
    media_type = doc.get("mediaType")
    if MediaType.is_index(media_type):
        return "index"
    if MediaType.is_manifest(media_type):
        return "manifest"
    # An image config's media type lives only in the descriptor pointing at it.
    if "rootfs" in doc:
        return "config"
    if "imageLayoutVersion" in doc:
        return "layout"
    # mediaType is optional in OCI manifests and indexes.
    if "manifests" in doc:
        return "index"
    if "layers" in doc and "config" in doc:
        return "manifest"
    return None


def check_document(data: bytes, kind: str | None = None, *, media_type: str | None = None,
                   where: str = "-") -> list[Problem]:
    """Return every problem of one JSON document, [] if it is valid.

    ``media_type`` is what the pointing descriptor declared: it picks the Docker or OCI schema
    for configs (which carry no media type) and must agree with a manifest's or index's own
    ``mediaType``; for those, the document's own ``mediaType`` picks the schema.
    """
    doc, problem = _parse(data)
    if problem is not None:
        return [Problem(where, problem)]
    if not isinstance(doc, dict):
        return [Problem(where, f"top level must be a JSON object, not {json_type(doc)}")]
    if kind is None:
        kind = detect_kind(doc)
        if kind is None:
            return [Problem(where, "cannot tell what kind of document this is; pass --kind")]
    elif kind not in KINDS:
        raise InputError(f"unknown document kind {kind!r}; expected one of {', '.join(KINDS)}")

    problems: list[Problem] = []
    own = doc.get("mediaType")
    # A descriptor document's mediaType is its target's, so only these kinds can mismatch.
    if media_type is not None and kind in ("index", "manifest", "config") \
            and isinstance(own, str) and own != media_type:
        problems.append(Problem(
            where, f"media type mismatch: descriptor says {media_type}, document says {own}"))

    name = _schema_name(kind, doc, media_type)
    extra = list(_extra_rules(kind, doc, docker=name.startswith("docker-")))
    extra_paths = {path for path, _ in extra}
    errors = _validator(name).iter_errors(doc)
    for error in sorted(errors, key=lambda e: (_path_key(e.absolute_path), e.message)):
        path = _json_path(error.absolute_path)
        # The extra rules say the same thing about a malformed digest, more helpfully.
        if error.validator == "pattern" and path in extra_paths:
            continue
        message = shorten(error.message, _MAX_MESSAGE)
        problems.append(Problem(where, f"schema: {message}{_at(path)}"))
    problems.extend(Problem(where, f"{message}{_at(path)}") for path, message in extra)
    return problems


def check_descriptor(desc: dict[str, Any], where: str) -> list[Problem]:
    """The rules beyond the schema for one descriptor (digest encoding, embedded data).

    Missing or mistyped fields are the schema's business and are not reported here.
    """
    if not isinstance(desc, dict):
        return [Problem(where, f"descriptor must be a JSON object, not {json_type(desc)}")]
    return [Problem(where, f"{msg}{_at(path)}")
            for path, msg in _descriptor_rules(desc, "", digest_problem)]


DigestRule = Callable[[Any], str | None]


def _extra_rules(kind: str, doc: dict[str, Any], *, docker: bool) -> Iterator[tuple[str, str]]:
    """Yield (JSON path, message) for the rules beyond the schema, in document order.

    Docker documents keep their own digest rule (sha256 and sha512 only); OCI ones accept
    any algorithm the spec's grammar allows, check the encoding of the registered ones and
    the uniqueness of annotation keys."""
    digest_rule = verify_problem if docker else digest_problem
    if not docker:
        yield from _duplicate_keys(kind, doc)
    if kind == "descriptor":
        yield from _descriptor_rules(doc, "", digest_rule)
    elif kind in ("manifest", "index"):
        for key in ("config", "subject"):
            if isinstance(doc.get(key), dict):
                yield from _descriptor_rules(doc[key], key, digest_rule)
        for key in ("layers", "manifests"):
            items = doc.get(key)
            for i, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict):
                    yield from _descriptor_rules(item, f"{key}[{i}]", digest_rule)
    elif kind == "config":
        config = doc.get("config")
        env = config.get("Env") if isinstance(config, dict) else None
        for i, entry in enumerate(env if isinstance(env, list) else []):
            if isinstance(entry, str) and ("=" not in entry or entry.startswith("=")):
                yield f"config.Env[{i}]", f"Env entry {shorten(repr(entry), 90)} is not KEY=value"
        rootfs = doc.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        for i, diff_id in enumerate(diff_ids if isinstance(diff_ids, list) else []):
            if isinstance(diff_id, str) and (message := digest_rule(diff_id)):
                yield f"rootfs.diff_ids[{i}]", message


def _duplicate_keys(kind: str, doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """annotations.md: keys MUST be unique within the map (a JSON parser keeps the last one
    silently); a config's Labels MUST follow the same rules."""
    if kind == "config":
        config = doc.get("config")
        maps = [("config.Labels", config.get("Labels") if isinstance(config, dict) else None)]
    else:
        maps = [("annotations", doc.get("annotations"))]
        maps += [(f"{key}.annotations", doc[key].get("annotations"))
                 for key in ("config", "subject") if isinstance(doc.get(key), dict)]
        for key in ("layers", "manifests"):
            items = doc.get(key)
            maps += [(f"{key}[{i}].annotations", item.get("annotations"))
                     for i, item in enumerate(items if isinstance(items, list) else [])
                     if isinstance(item, dict)]
    for path, value in maps:
        for key in getattr(value, "duplicates", ()):
            yield path, f"duplicate key {shorten(repr(key), 90)} (annotation keys MUST be unique)"


def _descriptor_rules(desc: dict[str, Any], path: str, digest_rule: DigestRule
                      ) -> Iterator[tuple[str, str]]:
    digest = desc.get("digest")
    if isinstance(digest, str) and (message := digest_rule(digest)):
        yield _join(path, "digest"), message
    data = desc.get("data")
    if isinstance(data, str):
        for message in _data_problems(data, desc):
            yield _join(path, "data"), message


def _data_problems(data: str, desc: dict[str, Any]) -> Iterator[str]:
    """Embedded content must be exactly what size and digest promise, or readers disagree."""
    if len(data) % 4:
        yield f"data is not padded base64 (length {len(data)} is not a multiple of 4)"
        return
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as e:
        yield f"data is not valid base64: {e}"
        return
    if base64.b64encode(raw).decode("ascii") != data:
        yield "data is not canonical base64 (non-zero padding bits)"
    size = desc.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size != len(raw):
        yield f"data decodes to {len(raw)} bytes but size is {size}"
    digest = desc.get("digest")
    # Only a registered algorithm can be recomputed; another one's encoding is unknown.
    if isinstance(digest, str) and verify_problem(digest) is None:
        algorithm, _, encoded = digest.partition(":")
        actual = hashlib.new(algorithm, raw).hexdigest()
        if actual != encoded:
            yield f"data does not match digest: its digest is {algorithm}:{actual}"


def _parse(data: bytes) -> tuple[Any, str | None]:
    """Strict RFC 8259 parsing: UTF-8 only, no NaN/Infinity; errors carry line and column."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        return None, (f"invalid JSON: invalid UTF-8 byte 0x{data[e.start]:02x} "
                      f"(line {line} column {column})")
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_object)
        problem = lone_surrogate(data, doc)
        return (None, f"invalid JSON: {problem}") if problem else (doc, None)
    except json.JSONDecodeError as e:
        # Drop Python-isms: "Invalid control character at", "(decode using utf-8-sig)".
        message = e.msg.removesuffix(" at").removesuffix(" (decode using utf-8-sig)")
        return None, f"invalid JSON: {message} (line {e.lineno} column {e.colno})"
    except _ConstantError as e:
        pos = next(m.start() for m in _CONSTANT.finditer(text) if not m.group().startswith('"'))
        line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        return None, f"invalid JSON: {e} (line {line} column {column})"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"


class _ConstantError(ValueError):
    pass


class _DuplicateKeys(dict[str, Any]):
    """A JSON object that had some keys more than once (the last value kept, as usual)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _DuplicateKeys(obj)
    counts = collections.Counter(key for key, _ in pairs)
    marked.duplicates = tuple(key for key, n in counts.items() if n > 1)
    return marked


def _reject_constant(name: str) -> Any:
    raise _ConstantError(f"{name} is not a JSON value")


def _schema_name(kind: str, doc: dict[str, Any], media_type: str | None) -> str:
    """Pick the schema file; a Docker document is recognised by its (or its pointer's) type."""
    own = doc.get("mediaType")
    declared = own if own is not None else media_type
    if kind == "index":
        docker = declared == MediaType.DOCKER_LIST
        return "docker-manifest-list.json" if docker else "oci-index.json"
    if kind == "manifest":
        docker = declared == MediaType.DOCKER_MANIFEST
        return "docker-manifest.json" if docker else "oci-manifest.json"
    if kind == "config":
        return "docker-config.json" if media_type == MediaType.DOCKER_CONFIG else "oci-config.json"
    return {"layout": "oci-layout.json", "descriptor": "oci-descriptor.json"}[kind]


def _schema_dir() -> Traversable:
    """Wheels carry the schemas inside the package; source trees keep them at the top."""
    packaged = resources.files("cvmfs_inject") / "_schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "schemas"


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any
                  ) -> Iterator[ValidationError]:
    """``pattern`` with ECMA-262 ``$``: Python's ``$`` also matches before a final newline,
    which would let ``"sha256:…\\n"`` or ``"text/plain\\n"`` through."""
    from jsonschema import ValidationError

    if not validator.is_type(instance, "string"):
        return
    anchored = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") \
        else pattern
    if not re.search(anchored, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _written_integer(checker: Any, instance: Any) -> bool:
    """``integer`` as the official (draft-04) schemas and Go readers take it: a number
    written without a fraction or exponent. Draft 2020-12 counts ``2.0`` and ``1e3`` as
    integers; umoci and skopeo fail to read them into an int."""
    return isinstance(instance, int) and not isinstance(instance, bool)


def preload() -> None:
    """Import jsonschema now, not at the first check (45 ms): a registry sink does it for a
    stacked update while the scan's helper walks, as after the scan the command runs on
    one core (`ImageSink.prepare_check`)."""
    import jsonschema  # noqa: F401


@functools.cache
def _validator(name: str) -> Any:
    """Load and compile one schema once. OCI schemas assert their formats, as the official
    ones do; in the Docker ones ``format`` stays an annotation. The schemas are not checked
    against the metaschema here: that took 0.03-0.05 s of every push, and the files ship
    with the code, so `tests/test_schemas.py` checks each of them once.

    jsonschema is imported here, on first use: commands that check no document (a local
    inject) do not pay for it."""
    from jsonschema import Draft202012Validator, validators

    try:
        schema = json.loads((_schema_dir() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load schema {name}: {e}; the installation is incomplete") from e
    types = Draft202012Validator.TYPE_CHECKER
    if name.startswith(("oci-", "docker-")):  # documents Go reads; a plan is ours (`level: 1.0`)
        types = types.redefine("integer", _written_integer)
    cls = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern}, type_checker=types)
    return cls(schema, format_checker=format_checker() if name.startswith("oci-") else None)


def schema_errors(name: str, instance: Any) -> list[tuple[list[str | int], str]]:
    """Where `instance` breaks the schema `name` (of ours, e.g. `batch-plan.json`): each
    problem's path and message, in document order."""
    found = [(list(error.absolute_path), error.message)
             for error in _validator(name).iter_errors(instance)]
    return sorted(found, key=lambda item: _path_key(item[0]))


def _json_path(parts: Iterable[str | int]) -> str:
    """Render a path as a reader would write it: layers[1].digest, platform["os.version"]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            out = _join(out, part)
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _path_key(parts: Iterable[str | int]) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in parts)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _at(path: str) -> str:
    return f" at {path}" if path else ""
