#!/usr/bin/env python3
"""`make bench-batch`: one tree into four images with `batch PLAN.yaml` (issue #13).

A local docker-registry gets three small bases: an OCI image (bench/oci:v1), a Docker v2s2
image (bench/docker:v1) and a two-platform OCI index (bench/multi:v1). The plan puts the
tree into the three (registry to registry) and into a docker-archive of bench/oci:v1. In
each round, in a rotating order so that none always runs first: the whole `batch` (a fresh
`output` repository prefix and archive path per round, so every round really uploads), each
of the four images alone with `run SRC TREE DEST` (what a plan saves against), and the pack
alone (in-process `pack_once`: the floor a batch cannot go under, as it packs before it
uploads). Medians over BENCH_RUNS rounds.

Traffic of the first batch, from the registry's access log: the completed upload PUTs of
the /cvmfs layer's blob and the PATCHes of their sessions (tied by the session's UUID in the
path), its cross-repository mounts (POST ?mount= -> 201), manifest PUTs, and the bytes the
registry stored for each completed blob or manifest PUT. Then the first plan again, as it
was: every image must say "unchanged" and the log must show no request that writes.

Knobs: BENCH_TREE ("20k"), BENCH_RUNS (3), BENCH_JOBS (unset: batch chooses).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import make_tree, start_registry, write_results  # noqa: E402
from direct import ACCESS  # noqa: E402
from stack import BLOBS, VERDICT, Registry  # noqa: E402

from cvmfs_inject.batch.packs import pack_once  # noqa: E402
from cvmfs_inject.demo.sample import build_sample_image  # noqa: E402
from cvmfs_inject.layout.store import Layout  # noqa: E402
from cvmfs_inject.pack.options import PackOptions  # noqa: E402

CLI = str(Path(sys.executable).parent / "cvmfs-inject")
# ACCESS leaves DELETE out (a cancelled upload session): a re-run must not send one either
WRITES = re.compile(r'"(PUT|PATCH|POST|DELETE) (\S+) HTTP/[\d.]+" (\d+)')
DIGEST = re.compile(r"sha256(?:%3A|:)([0-9a-f]{64})")
# base name -> (sample image arguments, push --format); the archive image reads bench/oci
BASES: dict[str, tuple[dict[str, Any], str]] = {
    "oci": ({}, "keep"), "docker": ({"docker": True}, "v2s2"),
    "multi": ({"platforms": ("amd64", "arm64")}, "keep")}
PLATFORMS = "linux/amd64,linux/arm64"
SINGLES = ("run oci", "run docker v2s2", "run 2-platform index", "run -> docker-archive")


@dataclass
class Timings:
    """Every pipeline's walls, in the order of the rounds."""

    walls: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, wall: float) -> None:
        self.walls.setdefault(name, []).append(wall)

    def median(self, name: str) -> float:
        return statistics.median(self.walls[name])


def cli(*args: str) -> tuple[float, dict[str, Any]]:
    """`cvmfs-inject --json --no-tls-verify ARGS` (global options before the command, as
    the issue writes them): (wall s, JSON). A failure stops the bench with the command's
    own output, which is what must be reported."""
    argv = [CLI, "-q", "--json", "--no-tls-verify", *args]
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    if done.returncode:
        raise SystemExit(f"$ {' '.join(argv)}\nexit {done.returncode}\n{done.stderr}{done.stdout}")
    return wall, json.loads(done.stdout) if done.stdout.strip() else {}


def write_plan(directory: Path, host: str, tree: Path, prefix: str) -> Path:
    """The issue's plan, outputs under `prefix/`; the archive is relative to the plan."""
    (directory / "out").mkdir(parents=True)  # batch does not create the archive's directory
    plan = directory / "plan.yaml"
    plan.write_text(f"""tree: {tree}
path: /cvmfs
compress: gzip
output: docker://{host}/{prefix}/{{repository}}:{{tag}}-cvmfs
images:
  - from: docker://{host}/bench/oci:v1
  - from: docker://{host}/bench/docker:v1
  - from: docker://{host}/bench/multi:v1
    platforms: [linux/amd64, linux/arm64]
  - from: docker://{host}/bench/oci:v1
    to: docker-archive:out/oci-cvmfs.tar:bench/oci:cvmfs
""")
    return plan


def scratch_dir() -> Path:
    """/dev/shm when it has room for the registry and two archives of the tree per round."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free >= 3 << 30
    return Path(tempfile.mkdtemp(prefix="bench-batch-", dir=shm if roomy else None))


def log_lines(reg: Registry, start: int = 0) -> list[str]:
    time.sleep(0.2)  # the registry writes its access line after answering
    return reg.log.read_text(errors="replace").splitlines()[start:]


def stored(reg: Registry, repo: str, ref: str) -> int:
    """Size of what the registry stored for a blob digest or a manifest tag/digest: its
    access log gives response sizes only."""
    if not ref.startswith("sha256:"):
        link = (reg.storage / "docker/registry/v2/repositories" / repo / "_manifests" / "tags"
                / ref / "current/link")
        ref = link.read_text()
    hexd = ref.removeprefix("sha256:")
    return (reg.storage / BLOBS / hexd[:2] / hexd / "data").stat().st_size


def traffic(reg: Registry, lines: list[str], layer: str) -> dict[str, Counter[str]]:
    """Per repository: the layer's completed upload PUTs and the PATCHes of those sessions,
    its mounts (201) and refused mounts, other completed blob uploads, manifest PUTs, and
    the bytes stored from completed blob and manifest PUTs."""
    per: dict[str, Counter[str]] = {}
    patches: Counter[str] = Counter()  # upload session UUID -> PATCHes
    for line in lines:
        match = ACCESS.search(line)
        if not match:
            continue
        method, path, status = match.group(1), match.group(2), match.group(3)
        where = re.match(r"/v2/(.+?)/(blobs|manifests)/(?:uploads/([0-9a-f-]*))?", path)
        if not where:
            continue
        count = per.setdefault(where.group(1), Counter())
        session, digest = where.group(3), DIGEST.search(path)
        if method == "PATCH" and session:
            patches[session] += 1
        elif method == "POST" and "mount=" in path and digest and digest.group(1) == layer:
            count["mounts" if status == "201" else "mounts refused"] += 1
        elif method == "PUT" and where.group(2) == "manifests" and status == "201":
            count["manifests"] += 1
            count["bytes"] += stored(reg, where.group(1), path.rpartition("/")[2])
        elif method == "PUT" and session and digest and status == "201":
            count["bytes"] += stored(reg, where.group(1), "sha256:" + digest.group(1))
            if digest.group(1) == layer:
                count["layer PUTs"] += 1
                count["layer PATCHes"] += patches[session]
            else:
                count["other blobs"] += 1
    return per


def pack_alone(tree: Path, scratch: Path) -> float:
    """Wall of packing the tree as batch does (gzip, /cvmfs), into a layout of its own."""
    store = Layout.create(scratch / "pack-alone")
    try:
        began = time.monotonic()
        pack_once(tree, PackOptions(mount_point="/cvmfs", compression="gzip"), store)
        return time.monotonic() - began
    finally:
        shutil.rmtree(scratch / "pack-alone", ignore_errors=True)


def rounds(reg: Registry, tree: Path, scratch: Path, runs: int, jobs: list[str]
           ) -> tuple[Timings, dict[str, Any], list[str]]:
    """BENCH_RUNS rounds, rotating the order; the first batch's JSON and its log lines."""
    host, times = reg.host, Timings()
    first: dict[str, Any] = {}
    first_lines: list[str] = []
    for n in range(1, runs + 1):
        single = scratch / f"single-{n}"
        single.mkdir()
        src = {name: f"docker://{host}/bench/{name}:v1" for name in BASES}
        commands: dict[str, list[str]] = {
            "run oci": ["run", src["oci"], str(tree), f"docker://{host}/s{n}/bench/oci:v1-cvmfs"],
            "run docker v2s2": ["run", src["docker"], str(tree),
                                f"docker://{host}/s{n}/bench/docker:v1-cvmfs"],
            "run 2-platform index": ["run", "--platform", PLATFORMS, src["multi"], str(tree),
                                     f"docker://{host}/s{n}/bench/multi:v1-cvmfs"],
            "run -> docker-archive": ["run", src["oci"], str(tree),
                                      f"docker-archive:{single / 'oci.tar'}:bench/oci:cvmfs"]}
        order = ["batch", *SINGLES, "pack alone"]
        shift = (n - 1) % len(order)
        for name in order[shift:] + order[:shift]:
            if name == "pack alone":
                times.add(name, pack_alone(tree, scratch))
            elif name == "batch":
                plan = write_plan(scratch / f"plan-{n}", host, tree, f"b{n}")
                start = len(log_lines(reg))
                wall, out = cli("batch", *jobs, str(plan))
                times.add(name, wall)
                times.add("batch (its own `seconds`)", out["seconds"])
                if n == 1:
                    first, first_lines = out, log_lines(reg, start)
                else:  # keep the first archive for the re-run; drop the others' bytes
                    shutil.rmtree(plan.parent / "out")
            else:
                times.add(name, cli(*commands[name])[0])
            print(f"round {n}: {name} {times.walls[name][-1]:.2f} s", flush=True)
        shutil.rmtree(single)
    return times, first, first_lines


def report(times: Timings, first: dict[str, Any], per: dict[str, Counter[str]],
           rerun: dict[str, Any], rerun_wall: float, writes: list[str],
           knobs: str, layer: tuple[str, int]) -> str:
    """The markdown: timings, the first batch's traffic, the re-run, the target lines."""
    slowest = max(times.median(name) for name in SINGLES)
    now = datetime.now(UTC)
    lines = [f"# cvmfs-inject batch (issue #13), {now:%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
             f"{platform.python_version()}; {knobs}", "",
             "| pipeline | wall s (median) | runs | walls s | x slowest single run |",
             "|---|---|---|---|---|"]
    for name, walls in times.walls.items():
        lines.append(f"| {name} | {times.median(name):.2f} | {len(walls)} | "
                     f"{' '.join(f'{w:.2f}' for w in walls)} | "
                     f"{times.median(name) / slowest:.2f} |")
    lines.append(f"| batch re-run, unchanged plan | {rerun_wall:.2f} | 1 | {rerun_wall:.2f} | "
                 f"{rerun_wall / slowest:.2f} |")
    digest, size = layer
    json_up = {img["destination"].split("/", 3)[-1].rpartition(":")[0]: img.get("uploaded")
               for img in first["images"]}
    keys = ("layer PUTs", "layer PATCHes", "mounts", "mounts refused", "other blobs",
            "manifests", "bytes")
    bytes_up = sum(count["bytes"] for count in per.values())
    lines += ["", f"First batch, registry traffic (layer {digest[:19]}, {size} bytes; "
              "the sources, only read, left out):", "",
              "| repository | layer upload PUTs | PATCHes of those sessions | layer mounts "
              "| mounts refused | other blobs uploaded | manifests PUT | bytes stored from "
              "PUTs | JSON `uploaded` |", "|---|---|---|---|---|---|---|---|---|"]
    total: Counter[str] = Counter()
    for repo, count in sorted(per.items()):
        if not any(count.values()):
            continue
        total.update(count)
        lines.append(f"| {repo} | " + " | ".join(str(count[k]) for k in keys)
                     + f" | {json_up.get(repo, '-')} |")
    lines.append("| **total** | " + " | ".join(str(total[k]) for k in keys)
                 + f" | {sum(v or 0 for v in json_up.values())} |")
    statuses = [img["status"] for img in rerun["images"]]
    lines += ["", "Re-run of the first plan (same output, same archive path):", "",
              "| image | destination | status | JSON `uploaded` |", "|---|---|---|---|"]
    lines += [f"| {img['number']} | {img['destination']} | {img['status']} | "
              f"{img.get('uploaded', '-')} |" for img in rerun["images"]]
    lines += ["", f"Requests that write during the re-run: {len(writes)}"
              + (": " + "; ".join(writes[:5]) if writes else "")]
    registry_images = [r for r in per if r.startswith("b1/")]
    mounted = sum(per[r]["mounts"] for r in registry_images)
    once = total["layer PUTs"] == 1 and mounted == len(registry_images) - 1
    ratio = times.median("batch") / slowest
    lines += ["", "Targets:", "",
              f"- {VERDICT[ratio <= 1.5]} batch wall <= 1.5x the slowest single run: "
              f"{times.median('batch'):.2f} s / {slowest:.2f} s = {ratio:.2f}x",
              f"- {VERDICT[once]} the layer uploaded once per registry, mounted into the "
              f"others: {total['layer PUTs']} upload(s) ({total['layer PATCHes']} PATCHes), "
              f"{mounted} mount(s) into {len(registry_images) - 1} other repositories",
              f"- {VERDICT[set(statuses) == {'unchanged'} and not writes]} re-run: every "
              f"image unchanged ({', '.join(statuses)}), {len(writes)} requests that write",
              f"- {VERDICT[sum(v or 0 for v in json_up.values()) > 0]} (check, not a target) "
              f"the first batch's JSON `uploaded` counts what went up: "
              f"{sum(v or 0 for v in json_up.values())} vs {bytes_up} bytes in the log"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Set up the registry and bases, run the rounds and the re-run, clean up (also on
    failure), then write the report."""
    name = os.environ.get("BENCH_TREE", "20k")
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    jobs = ["--jobs", os.environ["BENCH_JOBS"]] if os.environ.get("BENCH_JOBS") else []
    if runs < 1:
        raise SystemExit("BENCH_RUNS must be at least 1")
    tree = make_tree(name)
    scratch = scratch_dir()
    process = None
    try:
        (scratch / "registry").mkdir()
        process, host, log = start_registry(scratch / "registry")
        reg = Registry(host, log, scratch / "registry" / "storage")
        for base, (kwargs, fmt) in BASES.items():
            build_sample_image(scratch / f"base-{base}", "v1", **kwargs)
            cli("push", "--format", fmt, f"{scratch / f'base-{base}'}:v1",
                f"docker://{host}/bench/{base}:v1")
        times, first, first_lines = rounds(reg, tree, scratch, runs, jobs)
        failed = [img for img in first["images"] if img["status"] == "failed"]
        if failed:
            raise SystemExit(f"first batch: {json.dumps(failed, indent=2)}")
        top = cli("inspect", first["images"][0]["destination"])[1]["images"][0]
        layer = next(lay for lay in top["layers"] if lay["diff_id"] == first["packed"][0])
        per = traffic(reg, first_lines, layer["digest"].removeprefix("sha256:"))
        start = len(log_lines(reg))
        rerun_wall, rerun = cli("batch", *jobs, str(scratch / "plan-1" / "plan.yaml"))
        writes = [f"{m.group(1)} {m.group(2)[:80]} {m.group(3)}"
                  for line in log_lines(reg, start) if (m := WRITES.search(line))]
    finally:
        if process is not None:
            process.terminate()
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    knobs = (f"tree `{name}`, BENCH_RUNS={runs}, BENCH_JOBS="
             f"{jobs[1] if jobs else 'unset (batch chooses)'}, scratch "
             f"{'/dev/shm' if str(scratch).startswith('/dev/shm') else scratch.parent}, "
             f"TMPDIR {tempfile.gettempdir()}, local docker-registry over plain http.")
    text = report(times, first, per, rerun, rerun_wall, writes, knobs,
                  (layer["digest"], layer["size"]))
    write_results(text, "batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
