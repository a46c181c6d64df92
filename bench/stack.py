#!/usr/bin/env python3
"""`make bench-stack`: incremental updates of a stacked /cvmfs (issue #12), registry-direct.

A copy of the tree (scratch on /dev/shm when it has 5 GiB free) is injected into a local
docker-registry with `--max-layers N --state DIR` (the stack's base), and every step after
it is run, in three identical stacks (bench/stack, bench/stackb, bench/stackc: the same
layers, checked). Before each run of a step, the tree as it is then is injected as a fresh
single layer (no --max-layers: the reference "full inject") into a repository of its own
(bench/freshK), so that its layer is really uploaded, not found. Each run is compared with
the reference run just before it, and a step's ratio is the median of its three: this VM's
speed drifts, within a run too (the reference took 3.6 s at the start of one run and 5.5 s
at its end), which a comparison with a median over the whole run would take for the steps'
own cost. The per-run walls are in the table. Then
BENCH_UPDATES seeded updates, each changing about 1 % of the visible files (outside `.data/`):

- 0.5 % are rewritten in place through their visible name (open "wb": same inode, new bytes,
  half the same size, half not); being hard links into `.data/`, the whole group changes;
- a new release directory gets 0.3 % new files (content-addressed in `.data/`, linked from
  the release) plus as many new hard links to existing `.data/` content;
- 0.2 % of the visible names are deleted (their `.data/` content stays);
- one directory with at most 0.05 % of the files becomes a symlink to a sibling.

New content is a donor file's bytes behind 64 random bytes (it compresses like the tree);
all of it gets the current mtime. Update K is `inject stack:sK-1 TREE --dest stack:sK`, wall
clock timed. Uploaded bytes (of the run in bench/stack), from the registry's access log:
the stored size of each blob whose upload completed (PUT .../blobs/uploads/?digest= -> 201)
plus of each manifest PUT (resolved through the registry's storage); mounted or present
blobs count nothing. Stack bytes: the compressed sizes of the layers the config labels name
(`io.cvmfs-inject.stack`, else `cvmfs_injection_tar`), from `inspect`. After every step the
union (`unpack`) is compared with the tree: type, mode, mtime (s), sha256, symlink target,
hard-link groups. Last, the two last tags are pulled into a layout, pushed as a full and a
`--since` archive.

Knobs: BENCH_TREE (default "20k"), BENCH_UPDATES (5), BENCH_MAX_LAYERS (4), BENCH_SEED (12).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import make_base_layout, make_tree, start_registry, write_results  # noqa: E402
from direct import ACCESS  # noqa: E402

CLI = str(Path(sys.executable).parent / "cvmfs-inject")
DATA = ".data"
BLOBS = "docker/registry/v2/blobs/sha256"
VERDICT = {True: "PASS", False: "FAIL"}
# every step runs in each of these stacks, each run right after a reference run: a step's
# ratio to a full inject is the median of its runs' ratios to those reference runs
STACKS = ("bench/stack", "bench/stackb", "bench/stackc")
Snapshot = tuple[dict[str, tuple[str, int, int, str]], set[frozenset[str]]]


@dataclass
class Registry:
    """Where the commands go and where their traffic is read back."""

    host: str
    log: Path
    storage: Path


@dataclass
class Step:
    """One inject, or a step's runs in the three stacks (`same_step`): the table's row."""

    name: str
    wall: float
    uploaded: int
    report: dict[str, Any]
    stack_bytes: int = 0
    union: str = ""
    walls: tuple[float, ...] = ()
    ratios: tuple[float, ...] = ()  # of each run's wall to the reference run's before it


def cli(command: str, *args: str) -> tuple[float, str]:
    """One cvmfs-inject command against the plain-http registry: (wall s, --json stdout).
    A failure stops the run with the command's own stderr: that is what must be reported."""
    argv = [CLI, "-q", "--json", command, "--no-tls-verify", *args]
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    if done.returncode:
        raise SystemExit(f"$ {' '.join(argv)}\nexit {done.returncode}\n{done.stderr}{done.stdout}")
    return wall, done.stdout


def uploaded(reg: Registry, start: int) -> int:
    """Bytes the registry took since log line `start`: completed blob uploads and manifest
    PUTs, sized by what it stored (its access log gives response sizes only)."""
    total = 0
    time.sleep(0.2)  # the registry writes its access line after answering
    for line in reg.log.read_text(errors="replace").splitlines()[start:]:
        match = ACCESS.search(line)
        if not match or match.group(1) != "PUT" or match.group(3) != "201":
            continue
        path = match.group(2)
        if "/blobs/uploads/" in path:
            digest = re.search(r"digest=sha256%3A([0-9a-f]{64})", path)
        elif manifest := re.match(r"/v2/(.+)/manifests/([^?]+)", path):
            repo, ref = manifest.groups()
            if not ref.startswith("sha256:"):
                link = (reg.storage / "docker/registry/v2/repositories" / repo / "_manifests"
                        / "tags" / ref / "current/link")
                ref = link.read_text()
            digest = re.match(r"sha256:([0-9a-f]{64})", ref)
        else:
            continue
        if digest:
            hexd = digest.group(1)
            total += (reg.storage / BLOBS / hexd[:2] / hexd / "data").stat().st_size
    return total


def inject(reg: Registry, src: str, dest: str, tree: Path, *extra: str) -> Step:
    """Registry-direct inject of `tree` from tag `src` to `dest`, timed and metered."""
    start = len(reg.log.read_text(errors="replace").splitlines())
    wall, out = cli("inject", f"docker://{reg.host}/{src}", str(tree),
                    "--dest", f"docker://{reg.host}/{dest}", *extra)
    return Step(dest.rpartition(":")[2], wall, uploaded(reg, start), json.loads(out))


def reference(reg: Registry, base: Path, tree: Path, k: int) -> Step:
    """A fresh single-layer inject of the tree as it is now, into a repository of its own
    (its layer really uploaded): run before each run of a step, alternated with them."""
    repo = f"bench/fresh{k}"
    cli("push", f"{base}:v1", f"docker://{reg.host}/{repo}:v1")
    print(f"fresh single-layer inject {k} ...", flush=True)
    return inject(reg, f"{repo}:v1", f"{repo}:cvmfs", tree)


def same_step(runs: list[Step], references: list[Step]) -> Step:
    """One step run in each of the identical stacks, each after its reference run: its wall
    and its ratio to a full inject are the medians of the runs'. The runs must have made
    the same layer (the same trees from the same base give the same layers; the images
    differ in their creation times only)."""
    layers = {(json.dumps(run.report.get("layer")), json.dumps(run.report["stack"]))
              for run in runs}
    if len(layers) != 1:
        raise SystemExit(f"the stacks differ after the same step: {sorted(layers)}")
    walls = tuple(run.wall for run in runs)
    ratios = tuple(run.wall / ref.wall for run, ref in zip(runs, references, strict=True))
    return Step(runs[0].name, statistics.median(walls), runs[0].uploaded, runs[0].report,
                walls=walls, ratios=ratios)


def stack_bytes(reg: Registry, ref: str) -> int:
    """Compressed bytes of the /cvmfs layers, as the config labels name them."""
    image = json.loads(cli("inspect", f"docker://{reg.host}/{ref}")[1])["images"][0]
    labels = image["labels"]
    ids = set((labels.get("io.cvmfs-inject.stack") or labels["cvmfs_injection_tar"]).split(","))
    return sum(layer["size"] for layer in image["layers"] if layer["diff_id"] in ids)


def snapshot(root: Path) -> Snapshot:
    """rel -> (type, mode, mtime s, sha256 | target) and the hard-link groups; each inode
    is hashed once, so a group's content counts once."""
    entries: dict[str, tuple[str, int, int, str]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    digests: dict[tuple[int, int], str] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        path = os.path.join(root, rel)
        st = os.lstat(path)
        mode, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            entries[rel] = ("dir", mode, mtime, "")
            todo += [os.path.join(rel, name) for name in os.listdir(path)]
        elif stat.S_ISLNK(st.st_mode):
            entries[rel] = ("symlink", mode, mtime, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key not in digests:
                with open(path, "rb") as handle:
                    digests[key] = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
            inodes.setdefault(key, []).append(rel)
            entries[rel] = ("file", mode, mtime, digests[key])
        else:
            entries[rel] = ("other", mode, mtime, "")
    return entries, {frozenset(names) for names in inodes.values() if len(names) > 1}


def compare(tree: Path, out: Path) -> str:
    """"ok", or how many entries differ and the first three, then the hard-link groups."""
    (want, want_groups), (got, got_groups) = snapshot(tree), snapshot(out)
    diffs = [f"`{rel or '.'}` tree {want.get(rel)} union {got.get(rel)}"
             for rel in sorted(want.keys() | got.keys()) if want.get(rel) != got.get(rel)]
    missing, extra = want_groups - got_groups, got_groups - want_groups
    if missing or extra:
        example = sorted(next(iter(missing or extra)))[:3]
        diffs.append(f"hard-link groups: {len(missing)} only in the tree, {len(extra)} only "
                     f"in the union, e.g. {example}")
    return "ok" if not diffs else f"{len(diffs)} differ: " + "; ".join(diffs[:3])


def union_check(reg: Registry, ref: str, tree: Path, scratch: Path) -> str:
    """Unpack the stack's union from the registry and compare it with the working tree."""
    out = scratch / "union"
    try:
        cli("unpack", f"docker://{reg.host}/{ref}", str(out))
        return compare(tree, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def visible_files(tree: Path) -> list[str]:
    """Regular files outside `.data/`, sorted, so that the seed picks the same every run."""
    found = []
    for top, dirs, files in os.walk(tree):
        if top == str(tree):
            dirs[:] = [d for d in dirs if d != DATA]
        found += [os.path.relpath(os.path.join(top, f), tree) for f in files
                  if stat.S_ISREG(os.lstat(os.path.join(top, f)).st_mode)]
    return sorted(found)


def new_bytes(rng: random.Random, donor: Path, size: int) -> bytes:
    """`size` bytes that compress like the tree: a donor file behind 64 random bytes."""
    unit = rng.randbytes(64) + donor.read_bytes()
    return (unit * (size // len(unit) + 1))[:size]


def modify(tree: Path, rng: random.Random, step: int) -> str:
    """Change about 1 % of the visible files as the module docstring says; what was done."""
    visible = visible_files(tree)
    n = len(visible)
    data = sorted(str(p) for p in (tree / DATA).rglob("*") if p.is_file())
    # one small directory (depth >= 2) becomes a symlink to a sibling directory
    counts = Counter("/".join(rel.split("/")[:depth]) for rel in visible
                     for depth in range(2, rel.count("/") + 1))
    small = sorted(d for d, c in counts.items() if c <= max(1, n // 2000) and "releases" not in d)
    gone = rng.choice(small)
    parent = (tree / gone).parent
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.is_symlink()
                      and p.name != Path(gone).name)
    shutil.rmtree(tree / gone)
    os.symlink(rng.choice(siblings) if siblings else ".", tree / gone)
    visible = [rel for rel in visible if not rel.startswith(gone + "/")]
    k_rewrite, k_add, k_delete = round(n * 0.005), round(n * 0.003), round(n * 0.002)
    picks = rng.sample(visible, k_rewrite + k_delete)
    for rel in picks[:k_rewrite]:
        old = (tree / rel).stat().st_size
        size = old if rng.random() < 0.5 else max(1, int(old * rng.uniform(0.5, 1.5)))
        (tree / rel).write_bytes(new_bytes(rng, Path(rng.choice(data)), size))
    for rel in picks[k_rewrite:]:
        (tree / rel).unlink()
    repo = rng.choice(sorted(p.name for p in tree.iterdir() if p.name != DATA))
    release = tree / repo / "releases" / f"2026.{step:02d}"
    for sub in ("bin", "lib"):
        (release / sub).mkdir(parents=True)
    for i in range(k_add):
        size = (tree / rng.choice(visible)).stat().st_size
        content = new_bytes(rng, Path(rng.choice(data)), size)
        digest = hashlib.sha1(content).hexdigest()
        stored = tree / DATA / digest[:2] / digest
        stored.parent.mkdir(exist_ok=True)
        stored.write_bytes(content)
        os.link(stored, release / "bin" / f"new{i:04d}.h")
    for i in range(k_add):
        os.link(rng.choice(data), release / "lib" / f"link{i:04d}.so")
    return (f"{k_rewrite} rewritten, {k_add} new + {k_add} links in {repo}/releases/"
            f"{release.name}, {k_delete} deleted, {gone} ({counts[gone]} files) -> symlink")


def scratch_dir() -> Path:
    """/dev/shm when it has room for the tree copy, the unions and the registry (the stacks
    and a layer per step's reference runs, which the registry keeps once: about 3.5 GB for
    the 20k tree)."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free >= 5 << 30
    return Path(tempfile.mkdtemp(prefix="bench-stack-", dir=shm if roomy else None))


def delta_archives(reg: Registry, old: str, new: str, scratch: Path) -> tuple[int, int]:
    """Sizes of the full and of the --since delta oci-archive of the last update."""
    layout = scratch / "layout"
    for ref, tag in ((old, "old"), (new, "new")):
        cli("pull", f"docker://{reg.host}/{ref}", f"{layout}:{tag}")
    cli("push", f"{layout}:new", f"oci-archive:{scratch / 'full.tar'}")
    cli("push", f"{layout}:new", f"oci-archive:{scratch / 'delta.tar'}", "--since", f"{layout}:old")
    return (scratch / "full.tar").stat().st_size, (scratch / "delta.tar").stat().st_size


def report(steps: list[Step], fresh: list[Step], archives: tuple[int, int], limit: int,
           knobs: str, notes: list[str]) -> str:
    """The markdown table, the target lines and the per-step details. Walls are compared
    with the reference run before each (`same_step`); sizes with the first reference, of
    the copied tree."""
    fresh_size = fresh[0].report["layer"]["size"]
    fresh_wall = statistics.median(run.wall for run in fresh)
    now = datetime.now(UTC)
    lines = [f"# cvmfs-inject stacked updates (issue #12), {now:%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
             f"{platform.python_version()}; {knobs}", "",
             "Reference, fresh single-layer inject (registry-direct), run before each run "
             f"of a step into a repository of its own: median {fresh_wall:.2f} s (runs: "
             f"{' '.join(f'{run.wall:.2f}' for run in fresh)}); the copied tree's: "
             f"{fresh[0].uploaded} bytes uploaded, layer {fresh_size} bytes.", "",
             "| step | action | layers | wall s (median) | runs s | x full inject (median) | "
             "runs x | uploaded bytes | % of fresh layer | stack bytes | x fresh layer | "
             "union ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        st = s.report["stack"]
        lines.append(f"| {s.name} | {st['action']} | {st['layers']} | {s.wall:.2f} | "
                     f"{' '.join(f'{w:.2f}' for w in s.walls)} | "
                     f"{statistics.median(s.ratios):.2f} | "
                     f"{' '.join(f'{r:.2f}' for r in s.ratios)} | {s.uploaded} | "
                     f"{100 * s.uploaded / fresh_size:.2f} | {s.stack_bytes} | "
                     f"{s.stack_bytes / fresh_size:.2f} | {s.union} |")
    updates = steps[1:]
    shares = [s.uploaded / fresh_size for s in updates]
    ratios = [statistics.median(s.ratios) for s in updates]
    full, delta = archives
    lines += ["", "Targets:", "",
              f"- {VERDICT[statistics.median(shares) <= 0.05 and statistics.mean(shares) <= 0.08]}"
              f" uploaded per update: median {100 * statistics.median(shares):.2f} % (<= 5 %), "
              f"mean {100 * statistics.mean(shares):.2f} % (<= 8 %) of the fresh layer",
              f"- {VERDICT[max(ratios) <= 0.25]} update wall <= 0.25x full inject, every update "
              "(the median of its runs' ratios to the reference run before each): "
              f"{' '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})",
              f"- {VERDICT[all(s.stack_bytes <= 1.5 * fresh_size for s in steps)]} stack bytes "
              f"<= 1.5x fresh layer: max {max(s.stack_bytes for s in steps) / fresh_size:.2f}x",
              f"- {VERDICT[all(s.report['stack']['layers'] <= limit for s in steps)]} layers "
              f"<= {limit}: max {max(s.report['stack']['layers'] for s in steps)}",
              f"- {VERDICT[delta <= 0.05 * full]} delta archive <= 5 % of full: {delta} / {full} "
              f"bytes = {100 * delta / full:.2f} %",
              f"- {VERDICT[all(s.union == 'ok' for s in steps)]} union equals tree after every "
              "step", "", "Per step (JSON `stack` counts, JSON `written`, changes made):", ""]
    for s, note in zip(steps, notes, strict=True):
        st = s.report["stack"]
        lines.append(f"- {s.name}: added {st['added']}, changed {st['changed']}, removed "
                     f"{st['removed']}, compacted {st['compacted']}, downloaded "
                     f"{st['downloaded']}; written {s.report.get('written')}; {note}")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Set up, run the steps, clean up (also on failure), then write the report."""
    name = os.environ.get("BENCH_TREE", "20k")
    updates = int(os.environ.get("BENCH_UPDATES", "5"))
    limit = int(os.environ.get("BENCH_MAX_LAYERS", "4"))
    seed = int(os.environ.get("BENCH_SEED", "12"))
    if updates < 1:
        raise SystemExit("BENCH_UPDATES must be at least 1")
    source, base = make_tree(name), make_base_layout()
    scratch = scratch_dir()
    process = None
    try:
        tree = scratch / "cvmfs"
        subprocess.run(["cp", "-a", str(source), str(tree)], check=True)
        (scratch / "registry").mkdir()
        process, host, log = start_registry(scratch / "registry")
        reg = Registry(host, log, scratch / "registry" / "storage")
        for repo in STACKS:
            cli("push", f"{base}:v1", f"docker://{host}/{repo}:v1")
        fresh: list[Step] = []
        stacked = ("--max-layers", str(limit), "--state", str(scratch / "state"))
        rng = random.Random(seed)
        steps: list[Step] = []
        notes = ["the copied tree"]
        for k in range(updates + 1):
            if k:
                notes.append(modify(tree, rng, k))
            runs, references = [], []
            for repo in STACKS:
                references.append(reference(reg, base, tree, len(fresh) + len(references)))
                src = f"{repo}:v1" if k == 0 else f"{repo}:s{k - 1}"
                runs.append(inject(reg, src, f"{repo}:s{k}", tree, *stacked))
            fresh += references
            step = same_step(runs, references)
            step.name = "base" if k == 0 else f"update {k}"
            step.stack_bytes = stack_bytes(reg, f"{STACKS[0]}:s{k}")
            step.union = union_check(reg, f"{STACKS[0]}:s{k}", tree, scratch)
            steps.append(step)
            print(f"{step.name}: {step.report['stack']}, {step.wall:.2f} s "
                  f"({' '.join(f'{w:.2f}' for w in step.walls)}; x full inject "
                  f"{' '.join(f'{r:.2f}' for r in step.ratios)}), {step.uploaded} B up, "
                  f"union {step.union}", flush=True)
        archives = delta_archives(reg, f"{STACKS[0]}:s{updates - 1}",
                                  f"{STACKS[0]}:s{updates}", scratch)
    finally:
        if process is not None:
            process.terminate()
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    knobs = (f"tree `{name}` ({len(visible_files(source))} visible files), BENCH_UPDATES="
             f"{updates}, BENCH_MAX_LAYERS={limit}, --compact-ratio default, seed {seed}, "
             f"scratch {'/dev/shm' if str(scratch).startswith('/dev/shm') else scratch.parent}, "
             "local docker-registry over plain http.")
    text = report(steps, fresh, archives, limit, knobs, notes)
    write_results(text, "stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
