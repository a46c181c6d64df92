"""What the benchmarks share: the cached trees, the base layout, timing under GNU time."""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
VENV_BIN = Path(sys.executable).parent
TREE_TOOL = ROOT.parent / "shared" / "tools" / "make_shrinkwrap_tree.py"
GNU_TIME = "/usr/bin/time"

# name -> make_shrinkwrap_tree.py arguments
TREES = {
    "20k": ["--files", "20000", "--mib", "512", "--seed", "7"],
    "1m": ["--files", "300000", "--mib", "300", "--seed", "11"],
    "flat-64M": ["--files", "5000", "--mib", "64", "--seed", "11"],
    "flat-512M": ["--files", "20000", "--mib", "512", "--seed", "7"],
    "flat-2G": ["--files", "40000", "--mib", "2048", "--seed", "13"],
}


@dataclass
class Result:
    name: str
    walls: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    output_bytes: int = 0
    layer_digests: set[str] = field(default_factory=set)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.walls) if self.walls else float("nan")


def make_tree(name: str) -> Path:
    out = CACHE / "trees" / name
    if (out / "cvmfs").is_dir() and (out / ".complete").exists():
        return out / "cvmfs"
    if not TREE_TOOL.is_file():
        raise SystemExit(f"bench needs {TREE_TOOL} to generate its trees")
    shutil.rmtree(out, ignore_errors=True)
    print(f"generating tree {name} ...", flush=True)
    subprocess.run([sys.executable, str(TREE_TOOL), str(out), *TREES[name]], check=True,
                   stdout=subprocess.DEVNULL)
    (out / ".complete").touch()
    return out / "cvmfs"


def make_base_layout() -> Path:
    base = CACHE / "base-layout"
    if not (base / "index.json").exists():
        subprocess.run([sys.executable, "-c",
                        "from cvmfs_inject.demo.sample import build_sample_image as b;"
                        f"b({str(base)!r}, 'v1')"], check=True)
    return base


def timed(argv: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        subprocess.run([GNU_TIME, "-f", "%e %M", "-o", report.name, *argv], check=True,
                       cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall, rss = report.read().split()[-2:]
    return float(wall), int(rss)


def shell(command: str) -> list[str]:
    return ["bash", "-o", "pipefail", "-c", command]


def injected_layer(layout: Path, base: Path) -> Path:
    """The injected /cvmfs layer: the largest blob the base layout does not have."""
    old = {p.name for p in (base / "blobs" / "sha256").iterdir()}
    new = [p for p in (layout / "blobs" / "sha256").iterdir() if p.name not in old]
    return max(new, key=lambda p: p.stat().st_size)


def start_registry(root: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A plain-http docker-registry on a free port: (process, host:port, access log)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'storage'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = root / "registry.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=handle,
                                   stderr=handle)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"127.0.0.1:{port}", log


def write_results(text: str, kind: str = "") -> Path:
    """Print a results page and keep it as bench/results/DATE-Ncores[-KIND].md."""
    import datetime
    import os

    RESULTS.mkdir(exist_ok=True)
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    path = RESULTS / f"{day}-{os.cpu_count()}cores{'-' + kind if kind else ''}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return path
