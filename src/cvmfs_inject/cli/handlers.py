"""One handler per command: turn the parsed arguments into values, call the one library
function that does the work, and render its typed result. No handler chooses a backend:
the library does (`image.backends`), so tests reach every choice without the CLI.

Command modules are imported by the handler that needs them: the registry modules
(requests) and jsonschema were 0.3 s and 15 MiB of every local inject.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmfs_inject.cli.render import Reporter, format_inspect
from cvmfs_inject.errors import BatchFailed, InputError, UsageError, ValidationFailed
from cvmfs_inject.image.access import Access
from cvmfs_inject.layout.lock import DEFAULT_LOCK_TIMEOUT, LockWait
from cvmfs_inject.oci.refs import ImageRef, parse_layout_ref, parse_ref, split_host
from cvmfs_inject.pack.options import PackOptions, source_date_epoch
from cvmfs_inject.skopeo.command import RegistryOptions
from cvmfs_inject.stack.options import StackOptions

Handler = Callable[[argparse.Namespace, Reporter], Any]


def access(args: argparse.Namespace, out: Reporter) -> Access:
    """How this command reaches images; --creds-stdin is read when first needed, and a
    wait for a layout is announced on a terminal."""
    from cvmfs_inject.registry.credentials import read_credentials_stdin

    authfile = args.authfile or (Path(os.environ["REGISTRY_AUTH_FILE"])
                                 if os.environ.get("REGISTRY_AUTH_FILE") else None)
    options = RegistryOptions(tls_verify=True if args.tls_verify is None else args.tls_verify,
                              cert_dir=args.cert_dir, authfile=authfile,
                              debug=bool(args.debug))
    on_terminal = not args.quiet and sys.stderr.isatty()
    timeout = DEFAULT_LOCK_TIMEOUT if args.lock_timeout is None else args.lock_timeout
    return Access(options, ca_file=args.ca_file,
                  read_credentials=read_credentials_stdin if args.creds_stdin else None,
                  show_progress=on_terminal and not args.json,
                  layout_wait=LockWait(timeout, out.note if on_terminal else None))


def pack_options(args: argparse.Namespace) -> PackOptions:
    return PackOptions(mount_point=args.path,
                       compression=getattr(args, "compress", "gzip"),
                       level=getattr(args, "level", None),
                       excludes=tuple(getattr(args, "exclude", ())),
                       keep_owner=getattr(args, "keep_owner", False),
                       source_date_epoch=source_date_epoch())


def pull(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.pull import pull as pull_image

    src, dest = parse_ref(args.src), parse_layout_ref(args.dest)
    result = pull_image(src, dest, access(args, out), all_images=args.all, platform=args.platform)
    desc = result.descriptor
    out.line(f"pulled {src} into oci:{dest.path}:{result.tag} ({desc.digest})")
    return {"layout": dest.path, "tag": result.tag, "digest": desc.digest,
            "mediaType": desc.media_type}


def push(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.push import push as push_image

    src, dest = parse_layout_ref(args.src), parse_ref(args.dest)
    if args.since:
        return _push_delta(args, out, src, dest)
    digest = push_image(src, dest, access(args, out), manifest_format=args.format)
    out.line(f"pushed {src} to {dest} ({digest})")
    return {"source": str(src), "destination": str(dest), "digest": digest}


def _push_delta(args: argparse.Namespace, out: Reporter, src: ImageRef, dest: ImageRef
                ) -> Any:
    from cvmfs_inject.commands.push import push_delta

    if args.format != "keep":
        raise UsageError("push --since writes the layout's documents as they are: drop --format")
    since = parse_layout_ref(args.since)
    desc, delta = push_delta(src, dest, since, access(args, out))
    out.line(f"pushed {src} to {dest} ({desc.digest}): a delta archive of {delta.written} "
             f"blobs ({delta.written_bytes:,} B); {delta.omitted} blobs "
             f"({delta.omitted_bytes:,} B) left out, as {since} has them")
    return {"source": str(src), "destination": str(dest), "digest": desc.digest,
            "since": str(since), "blobsWritten": delta.written,
            "bytesWritten": delta.written_bytes, "blobsOmitted": delta.omitted,
            "bytesOmitted": delta.omitted_bytes}


def validate(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.validate import validate_document, validate_ref

    target = args.target
    name = "<stdin>" if target == "-" else target  # as the problems name it
    if target == "-" and args.creds_stdin:
        raise UsageError("--creds-stdin and a document on stdin (-) exclude each other")
    if args.kind or target == "-" or Path(target).is_file():
        if target == "-":
            data, where = sys.stdin.buffer.read(), name
        else:
            try:
                data, where = Path(target).read_bytes(), target
            except OSError as exc:
                raise InputError(f"{target}: cannot read: {exc.strerror}") from None
        problems = validate_document(data, args.kind, where)
    else:
        if (":" not in target and not split_host(target)[0]
                and not os.path.lexists(target)):  # neither a document nor a layout
            raise InputError(f"{target}: no such file or layout directory")
        problems = validate_ref(parse_ref(target), access(args, out))
    for problem in problems:
        out.error_line(str(problem))
    if problems:
        if args.json:
            out.emit({"valid": False, "problems": [str(p) for p in problems]})
        raise ValidationFailed(f"{name}: {len(problems)} problem(s) found")
    out.line(f"{name}: valid")
    return {"valid": True, "problems": []}


def inspect(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.inspect import inspect_ref

    report = inspect_ref(parse_ref(args.ref), access(args, out), args.platform)
    out.human(format_inspect(report))
    return report.to_json()


def gc(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.gc import gc as collect

    result = collect(parse_ref(args.layout), args.dry_run, access(args, out).layout_wait)
    verb = "would remove" if args.dry_run else "removed"
    for digest, size in result.removed:
        out.line(f"{verb} {digest} ({size:,} B)")
    for path, size in result.temp_removed:
        out.line(f"{verb} {path} ({size:,} B, left by an interrupted command)")
    temp = f" and {len(result.temp_removed)} temp files" if result.temp_removed else ""
    out.line(f"{verb} {len(result.removed)} blobs{temp}, {result.bytes_removed:,} B; "
             f"kept {result.kept}")
    return {"dry_run": args.dry_run,
            "removed": [{"digest": d, "size": s} for d, s in result.removed],
            "temp_removed": [{"path": p, "size": s} for p, s in result.temp_removed],
            "bytes_removed": result.bytes_removed, "kept": result.kept}


def init(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.inject import inject_ref

    report = inject_ref(parse_ref(args.ref), None, pack_options(args), access(args, out),
                        dest=parse_ref(args.dest) if args.dest else None, new_tag=args.tag,
                        platform=args.platform, init_only=True, warn=out.warn)
    if report.status == "already-prepared":
        out.line(f"{report.reference}: already prepared (has an injected layer); the image "
                 "is unchanged" + (" and tagged" if args.tag or args.dest else ""))
    elif report.status == "unchanged":  # --tag/--dest names this prepared image already
        out.line(f"{report.reference}: unchanged (already the image prepared with an empty "
                 f"{args.path} layer, {report.digest})")
    else:
        out.line(f"{report.reference}: prepared with an empty {args.path} layer "
                 f"({report.digest})")
    return report.to_json()


def _warn_if_parent_of_mount(tree: Path, mount: str, out: Reporter) -> None:
    """`inject IMG /srv` with only /srv/cvmfs inside gives /cvmfs/cvmfs/...: say so."""
    with contextlib.suppress(OSError):
        names = os.listdir(tree)
        if names == [mount.rstrip("/").rsplit("/", 1)[-1]]:
            out.warn(f"{tree} holds only '{names[0]}/', which ends up at {mount}/{names[0]}: "
                     f"DIR is the content of the mount point (did you mean {tree}/{names[0]}?)")


def stack_options(args: argparse.Namespace) -> StackOptions:
    return StackOptions(max_layers=args.max_layers, compact_ratio=args.compact_ratio,
                        state_dir=args.state, checksum=args.checksum)


def inject(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.inject import inject_ref

    _warn_if_parent_of_mount(args.dir, args.path, out)
    ref, dest = parse_ref(args.ref), parse_ref(args.dest) if args.dest else None
    with out.packing(args.dir) as progress:
        report = inject_ref(ref, args.dir, pack_options(args), access(args, out), dest=dest,
                            new_tag=args.tag, platform=args.platform,
                            via_layout=args.via_layout, stack_options=stack_options(args),
                            progress=progress, warn=out.warn, upload_progress=out.uploading)
    out.inject_summary(report)
    if report.destination and report.status != "unchanged":
        out.line(f"written to {report.destination} ({report.pushed_digest})")
    return report.to_json()


def unpack(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.unpack import unpack_ref

    report = unpack_ref(parse_ref(args.ref), args.dir, access(args, out), force=args.force,
                        platform=args.platform, mount_point=args.path,
                        via_layout=args.via_layout, warn=out.warn)
    if report.status == "empty":
        out.line(f"{args.dir}: empty (the image has no injected layer yet)")
    else:
        out.line(f"unpacked {report.entries} entries into {args.dir}")
    return report.to_json()


def run(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.run import run_ref

    _warn_if_parent_of_mount(args.dir, args.path, out)
    src, dest = parse_ref(args.src), parse_ref(args.dest)
    with out.packing(args.dir) as progress:
        report = run_ref(src, args.dir, dest, access(args, out), pack_options(args),
                         cache=args.layout, new_tag=args.tag, platform=args.platform,
                         manifest_format=args.format, via_layout=args.via_layout,
                         stack_options=stack_options(args), progress=progress, warn=out.warn,
                         upload_progress=out.uploading)
    out.inject_summary(report)
    out.line(f"pushed to {args.dest} ({report.pushed_digest or report.digest})")
    return report.to_json()


def batch(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.batch.plan import load_plan, shard
    from cvmfs_inject.commands.batch import batch as run_batch
    from cvmfs_inject.commands.batch import default_jobs

    plan = load_plan(args.plan, state_dir=args.state)
    jobs = shard(plan.jobs, args.shard) if args.shard else plan.jobs
    report = run_batch(plan, jobs, access(args, out), workers=args.jobs or default_jobs(),
                       cache=args.layout, dry_run=args.dry_run, packing=out.packing,
                       warn=out.warn, on_result=out.batch_line)
    out.batch_table(report)
    if report.failed:
        if args.json:
            out.emit(report.to_json())
        failed, total = len(report.failed), len(report.images)
        raise BatchFailed(f"{failed} of {total} images failed (the others are done)"
                          if failed < total else f"every image of the plan failed ({total})")
    return report.to_json()


COMMANDS: dict[str, Handler] = {
    "pull": pull, "push": push, "validate": validate, "inspect": inspect, "gc": gc,
    "init": init, "unpack": unpack, "inject": inject, "run": run, "batch": batch,
}
