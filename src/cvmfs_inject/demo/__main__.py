"""`make demo`: the whole job on a built-in sample, offline, with no registry account.

It builds a small base image with our own packer, a shrinkwrap-shaped tree, then runs the
two site workflows for real: the air-gapped one (docker-archive in, docker-archive out)
and the connected one against a docker-registry it starts on 127.0.0.1, ending with an
incremental update that uploads only what changed. Every step is a real `cvmfs-inject`
command, printed before it runs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cvmfs_inject.cli import main as cli_main
from cvmfs_inject.demo.sample import build_sample_image, build_sample_tree

SHARED_TREE_TOOL = Path(__file__).resolve().parents[3] / "shared/tools/make_shrinkwrap_tree.py"


def change(path: Path, text: str) -> None:
    """A change to a tree, said as the commands are: what the next inject finds."""
    print(f"\n# a change: {path} (a new file)", flush=True)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


def step(*argv: str) -> None:
    print(f"\n$ cvmfs-inject {shlex.join(argv)}", flush=True)
    code = cli_main(list(argv))
    if code != 0:
        raise SystemExit(f"demo step failed with exit code {code}")


def make_tree(out: Path) -> Path:
    if SHARED_TREE_TOOL.is_file():
        subprocess.run([sys.executable, str(SHARED_TREE_TOOL), str(out), "--files", "300",
                        "--mib", "8", "--seed", "1"], check=True, stdout=subprocess.DEVNULL)
        return out / "cvmfs"
    return build_sample_tree(out / "cvmfs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_registry(root: Path) -> Iterator[str | None]:
    """A throw-away docker-registry on 127.0.0.1 (plain http), or None if it is missing."""
    binary = shutil.which("docker-registry")
    if binary is None:
        yield None
        return
    port = free_port()
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'storage'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    with (root / "registry.log").open("wb") as log:
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    log = root / "registry.log"
                    raise SystemExit(f"docker-registry did not start; see {log}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", "demo-out")).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")
    print(f"cvmfs-inject demo: everything goes under {out}")
    build_sample_image(out / "base-layout", "1.0")
    tree = make_tree(out / "tree")
    print(f"sample base image: oci:{out / 'base-layout'}:1.0; sample tree: {tree}")

    # Air-gapped site: an image tarball in, an image tarball out.
    step("push", f"{out / 'base-layout'}:1.0", f"docker-archive:{out / 'base.tar'}:sample/base:1.0")
    result_tar = out / "base-cvmfs.tar"
    step("run", f"docker-archive:{out / 'base.tar'}", str(tree),
         f"docker-archive:{result_tar}:sample/base:1.0-cvmfs", "--layout", str(out / "cache"))
    step("validate", f"{out / 'cache'}")

    # The update cycle on a local layout: pull, unpack, change, inject, inspect.
    layout = out / "layout"
    step("pull", f"docker-archive:{result_tar}", f"{layout}:cvmfs")
    step("unpack", f"{layout}:cvmfs", str(out / "unpacked"))
    change(out / "unpacked" / "sft.cern.ch" / "NEW-RELEASE", "an update\n")
    step("inject", f"{layout}:cvmfs", str(out / "unpacked"))
    step("inspect", f"{layout}:cvmfs")
    step("gc", str(layout))

    # Connected site: registry to registry.
    registry_root = Path(tempfile.mkdtemp(prefix="registry-", dir=out))
    with local_registry(registry_root) as host:
        if host is None:
            print("\n(docker-registry is not installed: skipping the registry part)")
        else:
            step("push", "--no-tls-verify", f"{out / 'base-layout'}:1.0",
                 f"docker://{host}/sample/base:1.0")
            step("run", "--no-tls-verify", f"docker://{host}/sample/base:1.0", str(tree),
                 f"docker://{host}/sample/base:1.0-cvmfs")
            step("inspect", "--no-tls-verify", f"docker://{host}/sample/base:1.0-cvmfs")
            # An incremental update: /cvmfs as a stack of layers, only the delta uploaded.
            stacked = [f"docker://{host}/sample/base:1.0-cvmfs", str(tree), "--no-tls-verify",
                       "--max-layers", "3", "--state", str(out / "state")]
            change(tree / "sft.cern.ch" / "NEW-RELEASE" / "setup.sh", "# new release\n")
            print("# the index cache (--state) is new: this first update reads the image's "
                  "/cvmfs layer\n# once to index it, and warns that it does", flush=True)
            step("inject", *stacked)
            step("inspect", "--no-tls-verify", f"docker://{host}/sample/base:1.0-cvmfs")

    print(f"""
Done. The results:
  {result_tar}   the injected image as a docker-archive (docker load -i, skopeo, podman)
  {layout}       an OCI layout, tag 'cvmfs' (after the update cycle)
  {out / 'unpacked'}     the /cvmfs content unpacked from it
Look at them with:
  .venv/bin/cvmfs-inject inspect {layout}:cvmfs
  .venv/bin/cvmfs-inject validate {layout}
  skopeo inspect docker-archive:{result_tar}
  umoci unpack --rootless --image {layout}:cvmfs /tmp/rootfs-bundle""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
