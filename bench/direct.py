#!/usr/bin/env python3
"""Registry-direct versus through-a-layout `run`: wall time and bytes moved.

A base image with a few hundred MB of (incompressible) base layers is pushed to a local
docker-registry; then the same tree is injected into a new tag of the same repository,
once with `run --via-layout` (pull everything, inject, push) and once registry-direct.
Bytes are read off the registry's access log: downloaded = response sizes of blob GETs,
uploaded = sizes of the blobs whose upload was completed.

Knobs: BENCH_BASE_MIB (default 300), BENCH_TREE (default the 20k tree of bench/run.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CACHE, make_tree, start_registry  # noqa: E402

from cvmfs_inject.demo.sample import build_sample_image  # noqa: E402
from cvmfs_inject.image.layout import LayoutSource  # noqa: E402
from cvmfs_inject.image.source import read_image  # noqa: E402
from cvmfs_inject.layout.store import Layout  # noqa: E402
from cvmfs_inject.oci.jsondoc import canonical_json  # noqa: E402
from cvmfs_inject.oci.media import MediaType  # noqa: E402
from cvmfs_inject.oci.refs import ImageRef  # noqa: E402
from cvmfs_inject.pack.options import PackOptions  # noqa: E402
from cvmfs_inject.pack.packer import pack  # noqa: E402

CLI = str(Path(sys.executable).parent / "cvmfs-inject")
ACCESS = re.compile(r'"(GET|HEAD|PUT|PATCH|POST) (\S+) HTTP/[\d.]+" (\d+) (\d+|-)')


def big_base(path: Path, mib: int) -> None:
    """The sample image plus one base layer of `mib` MiB of random bytes."""
    build_sample_image(path, "v1")
    layout = Layout.open(path)
    with layout.writing(), tempfile.TemporaryDirectory() as scratch:
        for i in range(mib // 16):
            (Path(scratch) / f"blob-{i:03d}").write_bytes(os.urandom(16 << 20))
        with layout.writer() as writer:
            packed = pack(Path(scratch), writer, PackOptions(mount_point="/opt/big",
                                                             source_date_epoch=0))
            layer = writer.commit().replace(media_type=MediaType.OCI_LAYER_GZIP)
        top = layout.resolve("v1")
        image = read_image(LayoutSource(layout, ImageRef("oci", str(path), "v1")), top)
        manifest, config = image.manifest, image.config.edit()
        config["rootfs"]["diff_ids"].insert(0, packed.diff_id)
        config["history"].insert(0, {"created_by": "bench: big base layer"})
        config_desc = layout.put_bytes(canonical_json(config), MediaType.OCI_CONFIG)
        doc = manifest.edit()
        doc["layers"].insert(0, layer.to_dict())
        doc["config"] = config_desc.to_dict()
        layout.set_tag("v1", layout.put_bytes(canonical_json(doc), MediaType.OCI_MANIFEST))


def traffic(log: Path, start: int, storage: Path) -> tuple[int, int, int]:
    """(downloaded blob bytes, uploaded blob bytes, requests) since line `start`."""
    down = up = count = 0
    for line in log.read_text(errors="replace").splitlines()[start:]:
        match = ACCESS.search(line)
        if not match:
            continue
        count += 1
        method, path, status, size = match.groups()
        if method == "GET" and "/blobs/sha256:" in path and size != "-":
            down += int(size)
        if method == "PUT" and "/blobs/uploads/" in path and status == "201":
            digest = re.search(r"digest=sha256%3A([0-9a-f]{64})", path)
            if digest:
                hexd = digest.group(1)
                blob = storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
                up += blob.stat().st_size
    return down, up, count


def main() -> int:
    mib = int(os.environ.get("BENCH_BASE_MIB", "300"))
    tree = make_tree(os.environ.get("BENCH_TREE", "20k"))
    work = Path(tempfile.mkdtemp(prefix="direct-", dir=CACHE))
    rows = []
    try:
        big_base(work / "base", mib)
        for label, extra in (("run --via-layout (pull + inject + push)", ["--via-layout"]),
                             ("run, registry-direct", [])):
            # a fresh registry each time, so neither run finds the other's uploads
            root = Path(tempfile.mkdtemp(dir=work))
            process, host, log = start_registry(root)
            try:
                subprocess.run([CLI, "-q", "push", "--no-tls-verify", f"{work / 'base'}:v1",
                                f"docker://{host}/hep/base:1"], check=True)
                start = len(log.read_text(errors="replace").splitlines())
                began = time.monotonic()
                subprocess.run([CLI, "-q", "run", "--no-tls-verify", *extra,
                                f"docker://{host}/hep/base:1", str(tree),
                                f"docker://{host}/hep/base:1-cvmfs"], check=True)
                wall = time.monotonic() - began
                time.sleep(0.2)  # the registry writes its access line after answering
                down, up, count = traffic(log, start, root / "storage")
            finally:
                process.terminate()
                process.wait()
            rows.append(f"| {label} | {wall:.1f} | {down / 1e6:.0f} | {up / 1e6:.0f} | "
                        f"{count} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Base image: {mib} MiB of base layers; tree: {tree}\n")
    print("| pipeline | wall (s) | blob bytes downloaded (MB) | blob bytes uploaded (MB) "
          "| HTTP requests |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
