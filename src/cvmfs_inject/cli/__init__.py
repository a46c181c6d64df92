"""The command line: parse argv, call one library function per command, report.

This module is deliberately thin. All failures arrive as `CvmfsInjectError` subclasses
and are turned into one line on stderr and the documented exit code in `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_inject import __version__
from cvmfs_inject.cli.render import Reporter
from cvmfs_inject.commands import ops
from cvmfs_inject.commands.inject import InjectReport, check_tree_dir, inject, run, unpack
from cvmfs_inject.errors import (
    CvmfsInjectError,
    InputError,
    Terminated,
    UsageError,
    ValidationFailed,
)
from cvmfs_inject.image.refs import ImageRef, parse_layout_ref, parse_ref
from cvmfs_inject.pack.options import COMPRESSIONS, PackOptions, source_date_epoch
from cvmfs_inject.skopeo.auth import credentials_authfile
from cvmfs_inject.skopeo.command import RegistryOptions, Skopeo

if TYPE_CHECKING:
    from cvmfs_inject.commands.direct import Access
    from cvmfs_inject.registry.credentials import Credentials

# Registry-direct (oras, requests) and validation (jsonschema) are imported where they are
# used: a local inject should not pay their start-up time.
KINDS = ("layout", "index", "manifest", "config", "descriptor")

PROG = "cvmfs-inject"


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand, as skopeo users write them."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common options")
    group.add_argument("--tls-verify", nargs="?", const=True, type=_bool, default=default,
                       metavar="BOOL", help="require HTTPS and verify certificates (default)")
    group.add_argument("--no-tls-verify", dest="tls_verify", action="store_false",
                       default=default, help="plain http or unverified TLS (local registries)")
    group.add_argument("--cert-dir", type=Path, default=default, metavar="DIR",
                       help="CA *.crt and client *.cert/*.key for the registry, as skopeo")
    group.add_argument("--authfile", type=Path, default=default, metavar="FILE",
                       help="registry auth file (default: REGISTRY_AUTH_FILE, then "
                            "$XDG_RUNTIME_DIR/containers/auth.json, "
                            "~/.config/containers/auth.json, then $DOCKER_CONFIG/config.json "
                            "or ~/.docker/config.json)")
    group.add_argument("--creds-stdin", action="store_true", default=default,
                       help="read USERNAME:PASSWORD from the first line of stdin (for CI)")
    group.add_argument("--ca-file", type=Path, default=default, metavar="FILE",
                       help="CA bundle for the registry's TLS certificate (registry-direct)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="print only errors (and --json output)")
    group.add_argument("--debug", action="store_true", default=default,
                       help="pass --debug to skopeo and show tracebacks")
    group.add_argument("--json", action="store_true", default=default,
                       help="machine-readable output on stdout")
    return parser


def _pack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", default="/cvmfs", metavar="MOUNT",
                        help="mount point in the image (default /cvmfs)")
    parser.add_argument("--compress", choices=COMPRESSIONS, default="gzip",
                        help="layer compression (default gzip; zstd only into OCI images)")
    parser.add_argument("--level", type=int, help="compression level (gzip 0-3 ISA-L, "
                        "default 1; zstd 1-22, default 1)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out matching paths (repeatable; see README)")
    parser.add_argument("--keep-owner", action="store_true",
                        help="keep file owners instead of 0:0")
    parser.add_argument("--platform", metavar="OS/ARCH",
                        help="only this platform of a multi-platform image")
    parser.add_argument("--tag", metavar="NEW", help="write the result under a new tag")
    parser.add_argument("--via-layout", action="store_true",
                        help="registry images: pull, edit a local layout, push (instead of "
                             "registry-direct)")


def build_parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[_common(suppress=False)],
        description="Put a CernVM-FS shrinkwrap tree into container images as a /cvmfs layer.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    p = command("pull", "copy an image into a local OCI layout")
    p.add_argument("src", metavar="SRC",
                   help="docker://, docker-archive:, oci-archive: or oci: image")
    p.add_argument("dest", metavar="LAYOUT[:TAG]", help="local OCI layout (created if needed)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="all platforms of an index")
    group.add_argument("--platform", metavar="OS/ARCH", help="one platform of an index")

    p = command("push", "copy a layout image to a registry or an archive")
    p.add_argument("src", metavar="LAYOUT[:TAG]", help="local OCI layout image")
    p.add_argument("dest", metavar="DEST", help="docker://, docker-archive: or oci-archive:")
    p.add_argument("--format", choices=ops.FORMATS, default="keep",
                   help="manifest format (default keep: what it was pulled as)")

    p = command("validate", "check a layout, an image, or one JSON document")
    p.add_argument("target", metavar="REF|FILE|-",
                   help="layout (all tags), LAYOUT:TAG, registry or archive image, or one "
                        "JSON document (- for stdin)")
    p.add_argument("--kind", choices=KINDS, help="validate FILE (or - for stdin) as this kind")

    p = command("inspect", "show tags, platforms, layers, labels and history")
    p.add_argument("ref", metavar="REF", help="layout image or docker:// image")
    p.add_argument("--platform", metavar="OS/ARCH", help="only this platform of an index")

    p = command("gc", "delete blobs no tag reaches")
    p.add_argument("layout", metavar="LAYOUT", help="local OCI layout directory")
    p.add_argument("--dry-run", action="store_true", help="only say what would go")

    p = command("init", "add an empty mount-point layer (idempotent)")
    p.add_argument("ref", metavar="REF", help="layout image or docker:// image")
    p.add_argument("--path", default="/cvmfs", metavar="MOUNT",
                   help="mount point in the image (default /cvmfs)")
    p.add_argument("--platform", metavar="OS/ARCH", help="only this platform of an index")
    p.add_argument("--tag", metavar="NEW", help="write the result under a new tag")
    p.add_argument("--dest", metavar="DEST", help="registry-direct: write the result here")

    p = command("unpack", "write the injected layer's content into DIR")
    p.add_argument("ref", metavar="REF", help="layout image or docker:// image")
    p.add_argument("dir", type=Path, metavar="DIR", help="where the mount point's content goes")
    p.add_argument("--force", action="store_true", help="unpack into a non-empty DIR")
    p.add_argument("--platform", metavar="OS/ARCH")
    p.add_argument("--path", metavar="MOUNT", help="mount point (default: from the image)")
    p.add_argument("--via-layout", action="store_true",
                   help="registry images: pull the whole image first")

    p = command("inject", "pack DIR and put it into the image at the mount point")
    p.add_argument("ref", metavar="REF", help="layout image (edited in place) or docker:// image")
    p.add_argument("dir", type=Path, metavar="DIR", help="the content of the mount point")
    _pack_options(p)
    p.add_argument("--dest", metavar="DEST",
                   help="registry-direct: write the result to this docker:// reference")

    p = command("run", "pull SRC, inject DIR, validate, push to DEST")
    p.add_argument("src", metavar="SRC", help="docker://, docker-archive:, oci-archive: or oci:")
    p.add_argument("dir", type=Path, metavar="DIR", help="the content of the mount point")
    p.add_argument("dest", metavar="DEST", help="docker://, docker-archive: or oci-archive:")
    _pack_options(p)
    p.add_argument("--layout", metavar="CACHE", help="keep the working layout here")
    p.add_argument("--format", choices=ops.FORMATS, default="keep",
                   help="manifest format at DEST (default keep; oci/v2s2 need the layout path)")
    return parser


def _registry_options(args: argparse.Namespace) -> RegistryOptions:
    return RegistryOptions(tls_verify=True if args.tls_verify is None else args.tls_verify,
                           cert_dir=args.cert_dir, authfile=args.authfile or _env_authfile(),
                           debug=bool(args.debug))


def _skopeo(args: argparse.Namespace) -> Skopeo:
    options = _registry_options(args)
    credentials = _stdin_credentials(args)
    if credentials is not None:
        options = replace(options, authfile=credentials_authfile(credentials, _HOSTS(args)))
    show_progress = not args.quiet and not args.json and sys.stderr.isatty()
    return Skopeo(options, show_progress=show_progress)


def _access(args: argparse.Namespace) -> Access:
    from cvmfs_inject.commands.direct import Access

    return Access(_registry_options(args), _stdin_credentials(args), args.ca_file)


def _HOSTS(args: argparse.Namespace) -> list[str]:
    """Registries named on this command line: the stdin credentials are for them."""
    hosts = []
    for name in ("src", "dest", "ref", "target"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                ref = parse_ref(value)
            except CvmfsInjectError:
                continue
            if ref.is_registry:
                hosts.append(ref.registry)
    return hosts


def _stdin_credentials(args: argparse.Namespace) -> Credentials | None:
    """`--creds-stdin`: USERNAME:PASSWORD on the first line of stdin, read once per command
    (kept on the parsed arguments, as both skopeo and the registry client may need it)."""
    if not args.creds_stdin:
        return None
    if getattr(args, "stdin_credentials", None) is None:
        from cvmfs_inject.registry.credentials import read_credentials_stdin

        args.stdin_credentials = read_credentials_stdin()
    credentials: Credentials = args.stdin_credentials
    return credentials


def _env_authfile() -> Path | None:
    value = os.environ.get("REGISTRY_AUTH_FILE")
    return Path(value) if value else None


def _pack(args: argparse.Namespace, mount: str | None = None) -> PackOptions:
    return PackOptions(mount_point=mount or args.path,
                       compression=getattr(args, "compress", "gzip"),
                       level=getattr(args, "level", None),
                       excludes=tuple(getattr(args, "exclude", ())),
                       keep_owner=getattr(args, "keep_owner", False),
                       source_date_epoch=source_date_epoch())


def _cmd_pull(args: argparse.Namespace, out: Reporter) -> Any:
    src, dest = parse_ref(args.src), parse_layout_ref(args.dest)
    tag, desc = ops.pull(src, dest, _skopeo(args), all_images=args.all,
                         platform=args.platform)
    out.line(f"pulled {src} into oci:{dest.path}:{tag} ({desc.digest})")
    return {"layout": dest.path, "tag": tag, "digest": desc.digest, "mediaType": desc.media_type}


def _cmd_push(args: argparse.Namespace, out: Reporter) -> Any:
    src, dest = parse_layout_ref(args.src), parse_ref(args.dest)
    digest = ops.push(src, dest, _skopeo(args), manifest_format=args.format)
    out.line(f"pushed {src} to {dest} ({digest})")
    return {"source": str(src), "destination": str(dest), "digest": digest}


def _cmd_validate(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.validate import validate_layout
    from cvmfs_inject.oci.schema import check_document

    target = args.target
    if target == "-" and args.creds_stdin:
        raise UsageError("--creds-stdin and a document on stdin (-) exclude each other")
    if args.kind or target == "-" or Path(target).is_file():
        if target == "-":
            data, where = sys.stdin.buffer.read(), "<stdin>"
        else:
            try:
                data, where = Path(target).read_bytes(), target
            except OSError as exc:
                raise InputError(f"{target}: cannot read: {exc.strerror}") from None
        problems = check_document(data, args.kind, where=where)
    else:
        ref = parse_ref(target)
        if ref.transport == "oci":
            problems = validate_layout(ref)
        else:  # registry or archive: copy it (every blob checked on the way), then validate
            with tempfile.TemporaryDirectory(prefix="cvmfs-inject-validate-") as scratch:
                working = ImageRef("oci", os.path.join(scratch, "layout"), "validate")
                ops.pull(ref, working, _skopeo(args), all_images=True)
                problems = validate_layout(working)
    for problem in problems:
        out.error_line(str(problem))
    if problems:
        if args.json:
            out.emit({"valid": False, "problems": [str(p) for p in problems]})
        raise ValidationFailed(f"{target}: {len(problems)} problem(s) found")
    out.line(f"{target}: valid")
    return {"valid": True, "problems": []}


def _cmd_inspect(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.direct import RemoteSource

    ref = parse_ref(args.ref)
    remote = RemoteSource(_access(args).client(ref), ref) if ref.is_registry else None
    report = ops.inspect(ref, remote, args.platform)
    out.human(_format_inspect(report))
    return report


def _format_inspect(report: dict[str, Any]) -> str:
    lines = [f"{report['reference']}  {report['mediaType']}", f"  digest {report['digest']}"]
    if report.get("tags") is not None:
        lines.append(f"  layout tags: {', '.join(report['tags']) or '(none)'}")
    for image in report["images"]:
        lines.append(f"  image {image['platform']}  manifest {image['manifest']['digest']}")
        lines.append(f"    config {image['config']['digest']}  created "
                     f"{image['config']['created']}")
        injected = image["injected"]
        for i, layer in enumerate(image["layers"]):
            mark = "  <- injected" if injected and injected["position"] == i else ""
            lines.append(f"    layer {i}: {layer['mediaType']} {layer['size']} B "
                         f"{layer['digest']}{mark}")
            lines.append(f"             diff_id {layer['diff_id']}")
        for key, value in sorted(image["labels"].items()):
            lines.append(f"    label {key}={value}")
        for entry in image["history"]:
            created_by = str(entry.get("created_by", ""))[:100]
            empty = " (empty)" if entry.get("empty_layer") else ""
            lines.append(f"    history {entry.get('created', '')} {created_by}{empty}")
    return "\n".join(lines)


def _cmd_gc(args: argparse.Namespace, out: Reporter) -> Any:
    report = ops.gc(parse_ref(args.layout), args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    result = report.result
    for digest, size in result.removed:
        out.line(f"{verb} {digest} ({size} B)")
    for path, size in result.temp_removed:
        out.line(f"{verb} {path} ({size} B, left by an interrupted command)")
    temp = f" and {len(result.temp_removed)} temp files" if result.temp_removed else ""
    out.line(f"{verb} {len(result.removed)} blobs{temp}, {result.bytes_removed} bytes; "
             f"kept {result.kept}")
    return {"dry_run": args.dry_run,
            "removed": [{"digest": d, "size": s} for d, s in result.removed],
            "temp_removed": [{"path": p, "size": s} for p, s in result.temp_removed],
            "bytes_removed": result.bytes_removed, "kept": result.kept}


def _inject_any(args: argparse.Namespace, tree: Path | None, init_only: bool,
                progress: Any = None, warn: Any = None,
                upload_progress: Any = None) -> InjectReport:
    """A layout is edited in place; a registry image registry-direct (or via a layout).

    The registry modules (oras, requests, jsonschema) load only for registry refs: they
    were 0.3 s and 15 MiB of every local inject."""
    ref = parse_ref(args.ref)
    dest = parse_ref(args.dest) if args.dest else None
    if ref.is_registry:
        from cvmfs_inject.commands.direct import destination, inject_remote

        if not getattr(args, "via_layout", False):
            return inject_remote(ref, tree, _pack(args), _access(args), dest=dest,
                                 new_tag=args.tag, platform=args.platform,
                                 init_only=init_only, progress=progress, warn=warn,
                                 upload_progress=upload_progress)
        target = destination(ref, dest, args.tag)
        return run(ref, tree, target, _skopeo(args), _pack(args), platform=args.platform,
                   progress=progress, warn=warn, init_only=init_only)
    if dest is not None:
        raise UsageError("--dest is for registry images; for a layout use --tag")
    return inject(parse_layout_ref(args.ref), tree, _pack(args), new_tag=args.tag,
                  platform=args.platform, init_only=init_only, progress=progress, warn=warn)


def _cmd_init(args: argparse.Namespace, out: Reporter) -> Any:
    report = _inject_any(args, None, init_only=True, warn=out.warn)
    if report.status == "already-prepared":
        out.line(f"{report.reference}: already prepared (has an injected layer); left alone")
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


def _cmd_inject(args: argparse.Namespace, out: Reporter) -> Any:
    _warn_if_parent_of_mount(args.dir, args.path, out)
    with out.packing(args.dir) as progress:
        report = _inject_any(args, args.dir, init_only=False, progress=progress, warn=out.warn,
                             upload_progress=out.uploading)
    out.inject_summary(report)
    if report.destination and report.status != "unchanged":
        out.line(f"written to {report.destination} ({report.pushed_digest})")
    return report.to_json()


def _cmd_unpack(args: argparse.Namespace, out: Reporter) -> Any:
    from cvmfs_inject.commands.direct import unpack_remote

    ref = parse_ref(args.ref)
    if ref.is_registry and not args.via_layout:
        result = unpack_remote(ref, args.dir, _access(args), force=args.force,
                               platform=args.platform, mount_point=args.path, warn=out.warn)
    else:
        result = unpack(ref, args.dir, _skopeo(args), force=args.force,
                        platform=args.platform, mount_point=args.path, warn=out.warn)
    if result["status"] == "empty":
        out.line(f"{args.dir}: empty ({result['note']})")
    else:
        out.line(f"unpacked {result['entries']} entries into {args.dir}")
    return result


def _cmd_run(args: argparse.Namespace, out: Reporter) -> Any:
    _warn_if_parent_of_mount(args.dir, args.path, out)
    src, dest = parse_ref(args.src), parse_ref(args.dest)
    direct = src.is_registry and dest.is_registry and not args.via_layout and not args.layout
    with out.packing(args.dir) as progress:
        if direct:
            from cvmfs_inject.commands.direct import inject_remote

            if args.format != "keep":
                raise UsageError("--format converts through a layout: add --via-layout")
            check_tree_dir(args.dir)
            report = inject_remote(src, args.dir, _pack(args), _access(args), dest=dest,
                                   platform=args.platform, progress=progress, warn=out.warn,
                                   upload_progress=out.uploading)
        else:
            report = run(src, args.dir, dest, _skopeo(args), _pack(args), cache=args.layout,
                         new_tag=args.tag, platform=args.platform,
                         manifest_format=args.format, progress=progress, warn=out.warn)
    out.inject_summary(report)
    out.line(f"pushed to {args.dest} ({report.pushed_digest or report.digest})")
    return report.to_json()


COMMANDS: dict[str, Callable[[argparse.Namespace, Reporter], Any]] = {
    "pull": _cmd_pull, "push": _cmd_push, "validate": _cmd_validate, "inspect": _cmd_inspect,
    "gc": _cmd_gc, "init": _cmd_init, "unpack": _cmd_unpack, "inject": _cmd_inject,
    "run": _cmd_run,
}


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Reporter(quiet=bool(args.quiet), json_mode=bool(args.json))
    try:
        with _sigterm_as_interrupt():
            result = COMMANDS[args.command](args, out)
    except CvmfsInjectError as exc:
        if args.debug:
            raise
        if not isinstance(exc, ValidationFailed) or not args.json:
            out.fatal(str(exc))
        return exc.exit_code
    except Terminated:
        out.fatal("terminated")
        return 143
    except KeyboardInterrupt:
        out.fatal("interrupted")
        return 130
    if args.json:
        out.emit(result)
    return 0

