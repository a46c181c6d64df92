#!/usr/bin/env python3
"""`make bench`: inject speed and memory against umoci, tar | gzip, tar | pigz and the floor,
then unpack speed against tar -xzf, pigz, umoci (bench/unpack.py).

Every pipeline runs on the same tree in the same session, alternating (A B C A B C ...),
and the median wall time of each is reported, with ratios to the floor (`tar | sha256sum`,
reading the tree and hashing it, no compression) and to `umoci insert`. Peak RSS comes from
GNU time. Trees are generated once and cached under bench/cache/ (ignored by git).

Environment knobs: BENCH_RUNS (default 3), BENCH_TREES (comma list of names below,
default "20k"; "1m" is 300k files, about a million entries), BENCH_FLAT=1 adds the
memory-flatness trees (64 MiB, 512 MiB, 2 GiB).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    CACHE,
    TREES,
    VENV_BIN,
    Result,
    injected_layer,
    make_base_layout,
    make_tree,
    shell,
    timed,
    write_results,
)
from unpack import bench_unpack, unpack_table


def bench_tree(name: str, runs: int, only_ours: bool = False) -> list[Result]:
    tree = make_tree(name)
    base = make_base_layout()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=CACHE))
    q = lambda p: subprocess.list2cmdline([str(p)])  # noqa: E731
    pipelines: dict[str, tuple[list[str], Path | None]] = {
        "floor: tar | sha256sum": (shell(f"tar -cf - -C {q(tree)} . | sha256sum"), None),
        "cvmfs-inject inject (gzip)": ([str(VENV_BIN / "cvmfs-inject"), "-q", "inject",
                                        f"{work}/ours-gzip:v1", str(tree)], work / "ours-gzip"),
        "cvmfs-inject inject (zstd)": ([str(VENV_BIN / "cvmfs-inject"), "-q", "inject",
                                        f"{work}/ours-zstd:v1", str(tree), "--compress", "zstd"],
                                       work / "ours-zstd"),
        "umoci insert": (["umoci", "insert", "--rootless", "--image", f"{work}/umoci:v1",
                          str(tree), "/cvmfs"], work / "umoci"),
        "tar | pigz -n": (shell(f"tar -cf - -C {q(tree)} . | pigz -n > {work}/pigz.gz"), None),
        "tar | gzip -n": (shell(f"tar -cf - -C {q(tree)} . | gzip -n > {work}/gzip.gz"), None),
    }
    if only_ours:  # memory flatness: the floor and our two pipelines are enough
        pipelines = {k: v for k, v in pipelines.items() if k.startswith(("floor", "cvmfs"))}
    results = {label: Result(label) for label in pipelines}
    missing = {"umoci insert": "umoci", "tar | pigz -n": "pigz"}
    for label, program in missing.items():
        if label in pipelines and shutil.which(program) is None:
            results[label].note = f"skipped: {program} not installed"
            del pipelines[label]
    # warm the page cache (through a pipe: GNU tar skips file contents when writing to /dev/null)
    subprocess.run(shell(f"tar -cf - -C {q(tree)} . | cat > /dev/null"), check=True)
    for run in range(runs):
        for label, (argv, layout) in pipelines.items():
            if layout is not None:
                shutil.rmtree(layout, ignore_errors=True)
                shutil.copytree(base, layout, symlinks=True)
            subprocess.run(["sync"], check=False)
            wall, rss = timed(argv)
            results[label].walls.append(wall)
            results[label].rss_kib.append(rss)
            if layout is not None:
                layer = injected_layer(layout, base)
                results[label].output_bytes = layer.stat().st_size
                results[label].layer_digests.add(layer.name)
            elif "pigz" in label:
                results[label].output_bytes = (work / "pigz.gz").stat().st_size
            elif "gzip -n" in label:
                results[label].output_bytes = (work / "gzip.gz").stat().st_size
            print(f"  run {run + 1}/{runs} {label}: {wall:.2f} s, {rss / 1024:.0f} MiB",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return list(results.values())


def table(name: str, results: list[Result], tree: Path) -> str:
    floor = results[0].median
    umoci = next((r.median for r in results if r.name == "umoci insert" and r.walls), None)
    tar_bytes = subprocess.run(shell(f"tar -cf - -C {tree} . | wc -c"), capture_output=True,
                               text=True, check=True).stdout.strip()
    lines = [f"### tree `{name}` ({int(tar_bytes) / 1e6:.0f} MB tar stream; "
             f"make_shrinkwrap_tree.py {' '.join(TREES[name])})", "",
             "| pipeline | median wall (s) | runs | x floor | x umoci | peak RSS (MiB) | "
             "output (MB) | layer digests |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.walls:
            lines.append(f"| {r.name.replace('|', chr(92) + '|')} | {r.note} | | | | | | |")
            continue
        vs_umoci = f"{r.median / umoci:.2f}" if umoci else "-"
        out = f"{r.output_bytes / 1e6:.0f}" if r.output_bytes else "-"
        runs = " ".join(f"{w:.2f}" for w in r.walls)
        label = r.name.replace("|", "\\|")
        # the same tree must give the same layer in every run (one digest)
        digests = (f"{len(r.layer_digests)} distinct in {len(r.walls)} runs"
                   if r.layer_digests else "-")
        lines.append(f"| {label} | {r.median:.2f} | {runs} | {r.median / floor:.2f} | "
                     f"{vs_umoci} | {max(r.rss_kib) / 1024:.0f} | {out} | {digests} |")
    return "\n".join(lines)


def compressor_table(tree: Path) -> str:
    """Single-thread CPU throughput of each compressor on this tree's own tar stream.

    This says which compressor is cheaper per byte here, apart from the walk, which bounds
    a whole inject. Best of 3 on the first 256 MiB, fed in 1 MiB pieces like the packer.
    """
    import zstandard
    from isal import isal_zlib

    with subprocess.Popen(["tar", "-cf", "-", "-C", str(tree), "."],
                          stdout=subprocess.PIPE) as tar:
        assert tar.stdout is not None
        data = memoryview(tar.stdout.read(256 << 20))
        if tar.poll() is None and len(data) == 256 << 20:
            tar.kill()  # the sample is full; the rest of the stream is not needed
        elif tar.wait() != 0:
            raise SystemExit(f"tar of {tree} failed (exit {tar.returncode})")
    candidates = {
        "gzip, ISA-L level 1 (our default)": lambda: isal_zlib.compressobj(1, 8, 31),
        "gzip, ISA-L level 3": lambda: isal_zlib.compressobj(3, 8, 31),
        "zstd level 1 (our default)": lambda: zstandard.ZstdCompressor(
            level=1, write_checksum=True).compressobj(),
        "zstd level -5": lambda: zstandard.ZstdCompressor(
            level=-5, write_checksum=True).compressobj(),
        "zstd level 3": lambda: zstandard.ZstdCompressor(
            level=3, write_checksum=True).compressobj(),
    }
    lines = [f"### single-thread compressor CPU on the first {len(data) / 1e6:.0f} MB of its "
             "tar stream (best of 3)", "", "| compressor | MB/s | ratio |", "|---|---|---|"]
    for label, make in candidates.items():
        best, size = float("inf"), 0
        for _ in range(3):
            compressor = make()
            started = time.thread_time()
            size = sum(len(compressor.compress(data[i:i + (1 << 20)]))
                       for i in range(0, len(data), 1 << 20)) + len(compressor.flush())
            best = min(best, time.thread_time() - started)
        lines.append(f"| {label} | {len(data) / best / 1e6:.0f} | {size / len(data):.3f} |")
    return "\n".join(lines)


def main() -> int:
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    names = [n for n in os.environ.get("BENCH_TREES", "20k").split(",") if n]
    flat = ["flat-64M", "flat-512M", "flat-2G"] if os.environ.get("BENCH_FLAT") == "1" else []
    CACHE.mkdir(exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    sections = [f"# cvmfs-inject benchmark, {now:%Y-%m-%d %H:%M} UTC", "",
                f"Machine: {os.cpu_count()} cores, {platform.machine()}, "
                f"Python {platform.python_version()}; {runs} runs per pipeline, alternating; "
                "the floor is `tar -cf - . | sha256sum`.", ""]
    for name in names:
        print(f"tree {name}:", flush=True)
        results = bench_tree(name, runs)
        sections += [table(name, results, make_tree(name)), "",
                     compressor_table(make_tree(name)), ""]
        sections += [unpack_table(name, bench_unpack(name, runs)), ""]
    if flat:
        sections += ["## Memory flatness (our pipelines only, 1 run each)", ""]
    for name in flat:
        print(f"tree {name}:", flush=True)
        results = bench_tree(name, 1, only_ours=True)
        sections += [table(name, results, make_tree(name)), ""]
    report = "\n".join(sections)
    write_results(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
