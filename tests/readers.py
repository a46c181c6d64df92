"""Independent readers of what we write: umoci (unpack) and podman (pull, then mount the
image as a runtime sees it: overlayfs over the layers, whiteouts applied by the kernel)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    done = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}",
                           str(bundle)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"umoci unpack failed: {done.stderr}"
    return bundle / "rootfs"


def _podman(store: Path, runroot: str, driver: str, *args: str
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "--root", str(store / driver), "--runroot",
                           f"{runroot}/{driver}", "--storage-driver", driver, *args],
                          capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def podman_rootfs(layout: Path, tag: str, store: Path) -> Iterator[Path]:
    """The image's root filesystem as podman mounts it (overlay; vfs where the kernel
    cannot stack overlayfs here). podman mounts need root: skipped otherwise."""
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("podman (as root) is needed for this check")
    runroot = tempfile.mkdtemp(prefix="podman-")  # podman wants it under 50 characters
    try:
        for driver in ("overlay", "vfs"):
            pulled = _podman(store, runroot, driver, "pull", "-q", f"oci:{layout}:{tag}")
            assert pulled.returncode == 0, f"podman pull failed: {pulled.stderr}"
            image = pulled.stdout.strip().splitlines()[-1]
            mounted = _podman(store, runroot, driver, "image", "mount", image)
            if mounted.returncode == 0:
                break
        assert mounted.returncode == 0, f"podman image mount failed: {mounted.stderr}"
        try:
            yield Path(mounted.stdout.strip())
        finally:
            _podman(store, runroot, driver, "image", "unmount", "--all")
            _podman(store, runroot, driver, "rmi", "--all", "--force")
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
