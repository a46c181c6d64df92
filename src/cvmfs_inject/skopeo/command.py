"""skopeo as a subprocess: the only place that spawns it.

Credentials never reach skopeo's argv: it is given an auth *file* (ours, `skopeo.auth`, or
its own default lookup), so `ps` never shows a password. Its failures are explained by
`skopeo.errors`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cvmfs_inject import scratch
from cvmfs_inject.errors import MissingDependencyError, UsageError
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.skopeo.errors import classify, key_error_line

# runs argv with subprocess.run's keyword arguments (pass_fds, env)
Runner = Callable[..., "subprocess.CompletedProcess[bytes]"]

_POLICY_FILES = (Path.home() / ".config/containers/policy.json",
                 Path("/etc/containers/policy.json"))


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries: the skopeo options a user would pass, minus any secret."""

    tls_verify: bool = True
    cert_dir: Path | None = None
    authfile: Path | None = None
    debug: bool = False
    # a descriptor skopeo inherits: the in-memory auth file of `--creds-stdin` (/dev/fd/N)
    authfile_fd: int | None = None

    @classmethod
    def with_authfile_fd(cls, options: RegistryOptions, fd: int) -> RegistryOptions:
        """`options` with skopeo reading its auth file from descriptor `fd`."""
        return replace(options, authfile=Path(f"/dev/fd/{fd}"), authfile_fd=fd)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The descriptors skopeo must inherit."""
        return () if self.authfile_fd is None else (self.authfile_fd,)

    def flags(self, side: str, ref: ImageRef) -> list[str]:
        """skopeo flags for one side of a copy (`src`/`dest`) or for inspect (`''`)."""
        if not ref.is_registry:
            return []
        prefix = f"--{side}-" if side else "--"
        flags = [f"{prefix}tls-verify={'true' if self.tls_verify else 'false'}"]
        if self.cert_dir is not None:
            flags += [f"{prefix}cert-dir", str(self.cert_dir)]
        if self.authfile is not None:
            flags += [f"{prefix}authfile", str(self.authfile)]
        return flags


def _default_runner(argv: Sequence[str], **how: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                          check=False, **how)


def _progress_runner(argv: Sequence[str], **how: Any) -> subprocess.CompletedProcess[bytes]:
    """skopeo draws its progress bars on stdout: send them to our stderr (the terminal), so
    stdout stays for results and --json; stderr is still captured for error messages."""
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                          stderr=subprocess.PIPE, check=False, **how)


@functools.cache
def _dies_with_us() -> tuple[str, ...]:
    """What to run skopeo under so that the kernel kills it when we die (a killed push must
    not go on in an orphan that still sets the tag): util-linux's setpriv (Essential in
    Debian; `--pdeathsig` since util-linux 2.33, so it is tried once), else nothing."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    wrapper = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        done = subprocess.run([*wrapper, "true"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return wrapper if done.returncode == 0 else ()


class Skopeo:
    """Thin, typed front of the skopeo CLI. The runner is swappable for tests of error mapping."""

    def __init__(self, options: RegistryOptions | None = None,
                 runner: Runner | None = None, show_progress: bool = False) -> None:
        self.options = options or RegistryOptions()
        self._runner = runner or _default_runner
        self._show_progress = show_progress and runner is None

    def _base(self) -> list[str]:
        binary = shutil.which("skopeo")
        if binary is None:
            raise MissingDependencyError(
                "skopeo is not installed: install the Debian package with "
                "'apt-get install skopeo' (or run 'make demo' / 'make test' as root)")
        argv = [*_dies_with_us(), binary]
        if self.options.debug:
            argv.append("--debug")
        if not any(p.is_file() for p in _POLICY_FILES):
            argv.append("--insecure-policy")
        return argv

    def run(self, args: list[str], global_flags: list[str] | None = None,
            runner: Runner | None = None) -> bytes:
        # skopeo's big temporary files (by default in /var/tmp, or $TMPDIR) go into a
        # directory of ours (`--tmpdir`), which a later command removes if we are killed
        parent = os.environ.get("TMPDIR") or "/var/tmp"
        with scratch.temporary_directory("skopeo", parent) as directory:
            argv = [*self._base(), "--tmpdir", directory, *(global_flags or []), *args]
            done = (runner or self._runner)(argv, pass_fds=self.options.pass_fds)
        stderr = done.stderr.decode(errors="replace")
        if done.returncode != 0:
            raise classify(key_error_line(stderr), argv, done.returncode, stderr)
        return done.stdout

    def copy(self, src: ImageRef, dest: ImageRef, *, all_images: bool = False,
             platform: str | None = None, manifest_format: str | None = None,
             preserve_digests: bool = False, digestfile: Path | None = None) -> None:
        args = ["copy", "--retry-times", "2"]
        if not self._show_progress:
            args.append("--quiet")
        if all_images:
            args.append("--all")
        global_flags: list[str] = []
        if platform:
            parts = platform.split("/")
            if len(parts) not in (2, 3) or not all(parts):
                raise UsageError(f"invalid platform {platform!r}: expected OS/ARCH[/VARIANT]")
            global_flags += ["--override-os", parts[0], "--override-arch", parts[1]]
            if len(parts) == 3:
                global_flags += ["--override-variant", parts[2]]
        if manifest_format:
            args += ["--format", manifest_format]
        if preserve_digests:
            args.append("--preserve-digests")
        if digestfile is not None:
            args += ["--digestfile", str(digestfile)]
        args += self.options.flags("src", src) + self.options.flags("dest", dest)
        args += [src.skopeo(), dest.skopeo()]
        self.run(args, global_flags, _progress_runner if self._show_progress else None)

    def inspect_raw(self, ref: ImageRef, config: bool = False) -> bytes:
        args = ["inspect", "--raw", *(["--config"] if config else [])]
        args += [*self.options.flags("", ref), ref.skopeo()]
        return self.run(args)


