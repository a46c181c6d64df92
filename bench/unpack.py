"""`make bench`, second half: unpacking the injected layer against tar, pigz and umoci.

The layer comes from our own inject of the bench tree (gzip, zstd, uncompressed; the gzip
image also pushed to a local docker-registry for the registry row). Each pipeline writes
the layer's content into an empty directory, emptied (untimed) and synced before every run;
runs alternate like the inject bench. The directory is on /dev/shm when that tmpfs has room
(BENCH_UNPACK_DIR overrides): on a disk, write-back of the previous run's half gigabyte
made single runs vary threefold (7.5 to 22 s for the same command), which measures the
disk, not the tools.
`umoci unpack` writes the whole image (a bundle), but the base image is a few kB, so the
layer is nearly all of its work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import (
    CACHE,
    VENV_BIN,
    Result,
    injected_layer,
    make_base_layout,
    make_tree,
    shell,
    start_registry,
    timed,
)

REFERENCE = "tar -xzf"
TMPFS = Path("/dev/shm")
TMPFS_ROOM = 8 << 30  # bytes free on /dev/shm to use it: the 1m tree unpacks to about 1.5 GB


def output_parent() -> Path:
    """Where the unpacked directories go: BENCH_UNPACK_DIR, else /dev/shm if roomy."""
    chosen = os.environ.get("BENCH_UNPACK_DIR")
    if chosen:
        return Path(chosen)
    if TMPFS.is_dir() and shutil.disk_usage(TMPFS).free >= TMPFS_ROOM:
        return TMPFS
    return CACHE


def _injected(work: Path, base: Path, tree: Path, compress: str) -> tuple[Path, Path]:
    """A layout with the tree injected (tag v1) and its layer blob."""
    layout = work / f"layout-{compress}"
    shutil.copytree(base, layout, symlinks=True)
    subprocess.run([str(VENV_BIN / "cvmfs-inject"), "-q", "inject", f"{layout}:v1", str(tree),
                    "--compress", compress], check=True)
    return layout, injected_layer(layout, base)


def _pipelines(layouts: dict[str, tuple[Path, Path]], remote: str, out: Path
               ) -> dict[str, list[str]]:
    """Label -> command; `layouts` maps a compression to (layout, layer blob)."""
    ours = [str(VENV_BIN / "cvmfs-inject"), "-q", "unpack"]
    (gz_layout, gz), (zst_layout, zst), (raw_layout, raw) = (
        layouts["gzip"], layouts["zstd"], layouts["none"])
    return {
        "cvmfs-inject unpack (gzip)": [*ours, f"{gz_layout}:v1", str(out)],
        REFERENCE: shell(f"mkdir {out} && tar -xzf {gz} -C {out}"),
        "pigz -dc | tar -x": shell(f"mkdir {out} && pigz -dc {gz} | tar -x -C {out}"),
        "umoci unpack --rootless (gzip)": ["umoci", "unpack", "--rootless", "--image",
                                           f"{gz_layout}:v1", str(out)],
        "cvmfs-inject unpack (gzip, from a local registry)": [
            *ours, "--no-tls-verify", remote, str(out)],
        "cvmfs-inject unpack (zstd)": [*ours, f"{zst_layout}:v1", str(out)],
        "tar --zstd -xf": shell(f"mkdir {out} && tar --zstd -xf {zst} -C {out}"),
        "cvmfs-inject unpack (uncompressed)": [*ours, f"{raw_layout}:v1", str(out)],
        "tar -xf (uncompressed)": shell(f"mkdir {out} && tar -xf {raw} -C {out}"),
    }


def bench_unpack(name: str, runs: int) -> list[Result]:
    tree = make_tree(name)
    base = make_base_layout()
    work = Path(tempfile.mkdtemp(prefix="unpack-", dir=CACHE))
    out = Path(tempfile.mkdtemp(prefix="cvmfs-inject-bench-", dir=output_parent())) / "out"
    (work / "registry").mkdir()
    registry, host, _ = start_registry(work / "registry")
    try:
        layouts = {c: _injected(work, base, tree, c) for c in ("gzip", "zstd", "none")}
        remote = f"docker://{host}/bench/unpack:gzip"
        subprocess.run([str(VENV_BIN / "cvmfs-inject"), "-q", "push", "--no-tls-verify",
                        f"{layouts['gzip'][0]}:v1", remote], check=True)
        pipelines = _pipelines(layouts, remote, out)
        results = {label: Result(label) for label in pipelines}
        needs = {"pigz -dc | tar -x": "pigz", "umoci unpack --rootless (gzip)": "umoci",
                 "tar --zstd -xf": "zstd"}
        for label, program in needs.items():
            if shutil.which(program) is None:
                results[label].note = f"skipped: {program} not installed"
                del pipelines[label]
        for _, blob in layouts.values():  # warm the page cache with the layers
            subprocess.run(["cat", str(blob)], check=True, stdout=subprocess.DEVNULL)
        for run in range(runs):
            for label, argv in pipelines.items():
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
                wall, rss = timed(argv)
                results[label].walls.append(wall)
                results[label].rss_kib.append(rss)
                print(f"  run {run + 1}/{runs} {label}: {wall:.2f} s, {rss / 1024:.0f} MiB",
                      flush=True)
    finally:
        registry.terminate()
        registry.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)
    return list(results.values())


def unpack_table(name: str, results: list[Result]) -> str:
    reference = next(r.median for r in results if r.name == REFERENCE)
    lines = [f"### unpacking the injected layer of tree `{name}` into {output_parent()}", "",
             f"| pipeline | median wall (s) | runs | x {REFERENCE} | peak RSS (MiB) |",
             "|---|---|---|---|---|"]
    for r in results:
        label = r.name.replace("|", "\\|")
        if not r.walls:
            lines.append(f"| {label} | {r.note} | | | |")
            continue
        runs = " ".join(f"{w:.2f}" for w in r.walls)
        lines.append(f"| {label} | {r.median:.2f} | {runs} | {r.median / reference:.2f} | "
                     f"{max(r.rss_kib) / 1024:.0f} |")
    return "\n".join(lines)
