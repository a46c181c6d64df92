"""The command line's grammar: every command, argument and option, and its help."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from cvmfs_inject import PROG, __version__
from cvmfs_inject.batch import MAX_JOBS
from cvmfs_inject.commands.push import FORMATS
from cvmfs_inject.oci.schema import KINDS
from cvmfs_inject.pack.options import COMPRESSIONS
from cvmfs_inject.stack.options import DEFAULT_COMPACT_RATIO, MAX_LAYERS


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}")
    return value


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
    group.add_argument("--lock-timeout", type=_seconds, default=default, metavar="SECONDS",
                       help="wait this long for a layout another command is using (default "
                            "600; 0: fail at once, exit 7)")
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
    group = parser.add_argument_group("stack of layers (incremental updates; see README)")
    group.add_argument("--max-layers", type=_at_most(MAX_LAYERS), default=1, metavar="N",
                       help="keep the mount point as a stack of at most N layers: an update "
                            "adds a layer of what changed (default 1: one layer)")
    group.add_argument("--compact-ratio", type=float, default=DEFAULT_COMPACT_RATIO,
                       metavar="R", help="merge the deltas (or re-pack the base) when they "
                       f"would outgrow R times the base (default {DEFAULT_COMPACT_RATIO})")
    group.add_argument("--state", metavar="DIR", type=Path,
                       help="cache of the layers' tree indexes (default "
                            "$XDG_CACHE_HOME/cvmfs-inject)")
    group.add_argument("--checksum", action="store_true",
                       help="find changed files by content, not by size and time")


def _at_most(limit: int) -> Callable[[str], int]:
    """A whole number from 1 to `limit` (more layers or threads than that is a typo)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"{text!r}: from 1 to {limit}")
        return value

    return whole


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, like every other error (skopeo and git point at --help
    too), instead of argparse's usage block: scripts and logs get the line that matters."""

    commands: dict[str, argparse.ArgumentParser]  # each command's own parser, by name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """An argument no parser took is the command's usage error, pointing at its help
        (argparse gives it to the top parser, whose help does not list the command's
        options)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.commands.get(getattr(parsed, "command", None) or "", self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    parser = _OneLineParser(
        prog=PROG, parents=[_common(suppress=False)],
        description="Put a CernVM-FS shrinkwrap tree into container images as a /cvmfs layer.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.commands = sub.choices

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
    p.add_argument("--format", choices=FORMATS, default="keep",
                   help="manifest format (default keep: what it was pulled as)")
    p.add_argument("--since", metavar="LAYOUT:TAG",
                   help="write a delta oci-archive: leave out the layers this image has "
                        "(the receiving layout must hold it)")

    p = command("validate", "check a layout, an image, or one JSON document")
    p.add_argument("target", metavar="REF|FILE|-",
                   help="layout (all tags), LAYOUT:TAG, registry or archive image, or one "
                        "JSON document (- for stdin)")
    p.add_argument("--kind", choices=KINDS, help="validate FILE (or - for stdin) as this kind")

    p = command("inspect", "show tags, platforms, layers, labels and history")
    p.add_argument("ref", metavar="REF",
                   help="layout image, docker:// image, or oci-archive:/docker-archive: file")
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
    p.add_argument("ref", metavar="REF",
                   help="layout image, docker:// image, or oci-archive:/docker-archive: file")
    p.add_argument("dir", type=Path, metavar="DIR", help="where the mount point's content goes")
    p.add_argument("--force", action="store_true", help="unpack into a non-empty DIR")
    p.add_argument("--platform", metavar="OS/ARCH", help="the image of this platform of an index")
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
    p.add_argument("--format", choices=FORMATS, default="keep",
                   help="manifest format at DEST (default keep; oci/v2s2 need the layout path)")

    p = command("batch", "one tree into many images, as a YAML plan says (see README)")
    p.add_argument("plan", type=Path, metavar="PLAN.yaml", help="the plan")
    p.add_argument("--jobs", type=_at_most(MAX_JOBS), metavar="N",
                   help="images at once (default: twice the cores, at most 8)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")
    p.add_argument("--shard", metavar="K/N",
                   help="do the K-th of N slices of the plan (a job array, a CI matrix)")
    p.add_argument("--layout", metavar="CACHE",
                   help="working layout for archives and --format, shared by the images")
    p.add_argument("--state", metavar="DIR", type=Path,
                   help="tree index cache for images with max_layers (default "
                        "$XDG_CACHE_HOME/cvmfs-inject)")
    return parser
