"""A batch plan: YAML (like DUCC's wishlists), checked against `schemas/batch-plan.json`,
expanded into one `Job` per image.

Every value's line is kept while the YAML is read, so a problem is reported as
`PLAN:LINE: images[2].platforms[0]: ...`, the key and the line a person fixes. Relative
paths (trees, archives) are relative to the plan's directory, as docker compose reads
its file, so a plan means the same from wherever `make` runs it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_inject.errors import InputError, UsageError
from cvmfs_inject.oci.refs import ImageRef, parse_ref
from cvmfs_inject.oci.schema import schema_errors
from cvmfs_inject.pack.options import PackOptions, source_date_epoch
from cvmfs_inject.stack.options import StackOptions

SCHEMA = "batch-plan.json"
MAX_PLAN_BYTES = 4 << 20  # a plan is a few kilobytes; a larger file is not one
# settings an image takes from the top of the plan unless it has its own
INHERITED = ("tree", "path", "compress", "level", "exclude", "keep_owner", "max_layers",
             "format")
TOP_KEYS = (*INHERITED, "output", "images")
IMAGE_KEYS = ("from", "to", "platforms", *INHERITED)
_UNEXPECTED = re.compile(r"\('([^']*)' was unexpected\)")


@dataclass(frozen=True)
class Job:
    """One image of the plan: where from, where to, and what goes in."""

    number: int  # 1-based position in the plan's `images`
    line: int
    src: ImageRef
    dest: ImageRef
    platforms: tuple[str, ...]
    tree: Path
    options: PackOptions
    stack: StackOptions
    manifest_format: str

    @property
    def pack_key(self) -> tuple[object, ...]:
        """Jobs with the same key take the same layer, packed once."""
        o = self.options
        return (str(self.tree), o.mount_point, o.compression, o.level, o.excludes,
                o.keep_owner)

    @property
    def platform(self) -> str | None:
        return ",".join(self.platforms) or None


@dataclass(frozen=True)
class Plan:
    path: Path
    jobs: list[Job]


def load_plan(path: Path, *, state_dir: Path | None = None) -> Plan:
    """Read, check and expand a plan; InputError (one line naming the file, line and key)
    when it is not a good one."""
    try:
        with path.open("rb") as f:
            text = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the plan: {exc.strerror or exc}") from None
    if len(text) > MAX_PLAN_BYTES:
        raise InputError(f"{path}: over {MAX_PLAN_BYTES >> 20} MiB; not a plan")
    doc, lines = _read_yaml(text, path)
    problems = schema_errors(SCHEMA, doc)
    if problems:
        where, message = _pointed(*problems[0])
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{path}:{_line(lines, where)}: {_key(where)}: {message}{more}")
    base = path.resolve().parent
    jobs = [_job(doc, i, image, lines, base, path, state_dir)
            for i, image in enumerate(doc["images"])]
    _refuse_shared_destinations(jobs, path)
    return Plan(path, jobs)


def _refuse_shared_destinations(jobs: list[Job], plan: Path) -> None:
    """Two images written to one place would race, and the last one would win each run:
    a tag names one image, an archive file holds one."""
    seen: dict[tuple[str, ...], Job] = {}
    for job in jobs:
        dest = job.dest
        key = ((dest.registry, dest.repository, dest.tag or "latest") if dest.is_registry
               else (os.path.realpath(dest.path),))
        if key in seen:
            first = seen[key]
            raise InputError(f"{plan}:{job.line}: images[{job.number - 1}].to: {dest} is also "
                             f"the destination of images[{first.number - 1}] (line "
                             f"{first.line}); give each image a destination of its own")
        seen[key] = job


def shard(jobs: list[Job], spec: str) -> list[Job]:
    """The K-th of N slices (`--shard K/N`): every N-th image from the K-th, so each slice
    gets a spread of the plan whatever its order, and the slices cover it exactly once."""
    try:
        k, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec!r}: give K/N, like 2/4") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard {spec!r}: K must be between 1 and N")
    return jobs[k - 1::n]


def _read_yaml(text: bytes, path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """The document, and the line of every value by its path (keys and indexes)."""
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):  # `*name` can grow a plan exponentially
                raise InputError(f"{path}:{event.start_mark.line + 1}: YAML aliases (*name) "
                                 "are not read in a plan; write the value, or set it once "
                                 "at the top for every image")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}{line}: not valid YAML: {problem}") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a plan") from None
    lines: dict[tuple[Any, ...], int] = {}

    def visit(current: Any, where: tuple[Any, ...]) -> None:
        lines[where] = current.start_mark.line + 1
        if isinstance(current, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in current.value:
                if key.value in seen:  # YAML forbids it; PyYAML would keep the last one
                    raise InputError(f"{path}:{key.start_mark.line + 1}: "
                                     f"{_key((*where, key.value))}: given twice")
                seen.add(key.value)
                visit(value, (*where, key.value))
        elif isinstance(current, yaml.SequenceNode):
            for i, value in enumerate(current.value):
                visit(value, (*where, i))

    if node is not None:
        visit(node, ())
    return doc, lines


def _pointed(where: list[Any], message: str) -> tuple[list[Any], str]:
    """An unknown key is reported at its own line, with the key it may be a typo of."""
    match = _UNEXPECTED.search(message)
    if match is None:
        return where, message
    key = match.group(1)
    known = IMAGE_KEYS if where and where[0] == "images" else TOP_KEYS
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are {', '.join(known)}"
    return [*where, key], f"unknown key {key!r}{hint}"


def _line(lines: dict[tuple[Any, ...], int], where: list[Any] | tuple[Any, ...]) -> int:
    """The line of the deepest part of `where` that is in the file."""
    parts = tuple(where)
    while parts and parts not in lines:
        parts = parts[:-1]
    return lines.get(parts, 1)


def _key(where: list[Any] | tuple[Any, ...]) -> str:
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the plan)"


def _job(doc: dict[str, Any], i: int, image: dict[str, Any],
         lines: dict[tuple[Any, ...], int], base: Path, plan: Path,
         state_dir: Path | None) -> Job:
    where = ("images", i)
    line = _line(lines, where)

    def bad(key: str, message: str) -> InputError:
        at = (*where, key) if key in image else (key,) if key in doc else where
        return InputError(f"{plan}:{_line(lines, at)}: {_key(at)}: {message}")

    settings = {key: _whole(image.get(key, doc.get(key))) for key in INHERITED}
    if settings["tree"] is None:
        raise bad("tree", "no tree: give `tree` at the top of the plan or for this image")
    try:
        src = _local(parse_ref(image["from"]), base)
    except UsageError as exc:
        raise bad("from", str(exc)) from None
    target = image.get("to") or doc.get("output")
    if target is None:
        raise bad("to", "no destination: give `to`, or `output` at the top of the plan")
    if "to" not in image:
        target = _expand(target, src, bad)
    try:
        dest = _local(parse_ref(target), base)
    except UsageError as exc:
        raise bad("to", str(exc)) from None
    try:
        options = PackOptions(mount_point=settings["path"] or "/cvmfs",
                              compression=settings["compress"] or "gzip",
                              level=settings["level"],
                              excludes=tuple(settings["exclude"] or ()),
                              keep_owner=bool(settings["keep_owner"]),
                              source_date_epoch=source_date_epoch())
    except UsageError as exc:  # the message names the option: --path, --level
        raise bad("path" if "--path" in str(exc) else "level", str(exc)) from None
    stack = StackOptions(max_layers=settings["max_layers"] or 1, state_dir=state_dir)
    if dest.transport == "oci":
        raise bad("to", f"{dest}: a batch writes to registries and archives; a layout is "
                        "its working cache (--layout)")
    tree = Path(settings["tree"])
    return Job(i + 1, line, src, dest, tuple(image.get("platforms") or ()),
               tree if tree.is_absolute() else base / tree, options, stack,
               settings["format"] or "keep")


def _whole(value: Any) -> Any:
    """JSON Schema counts 1.0 as an integer: the plan's `level: 1.0` is the number 1."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _local(ref: ImageRef, base: Path) -> ImageRef:
    """Archives and layouts named relative to the plan's directory."""
    if ref.is_registry or os.path.isabs(ref.path):
        return ref
    return ImageRef(ref.transport, str(base / ref.path), ref.tag, ref.digest)


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _expand(template: str, src: ImageRef, bad: Any) -> str:
    """`output` for one image: {repository} and {tag} of its `from`, substituted as text
    (never `str.format`, whose specs and attribute lookups a plan must not reach)."""
    if not src.is_registry:
        raise bad("to", f"`output` needs the repository of a registry image; {src} is an "
                        "archive: give this image `to`")
    values = {"repository": src.repository, "tag": src.tag or "latest"}
    unknown = [name for name in _PLACEHOLDER.findall(template) if name not in values]
    stray = set("{}") & set(_PLACEHOLDER.sub("", template))
    if unknown or stray:
        raise bad("to", f"`output` {template!r}: only {{repository}} and {{tag}} may be used")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
