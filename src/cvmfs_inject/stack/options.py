"""What a stacked inject is told (light: the CLI parser imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvmfs_inject.errors import UsageError

DEFAULT_COMPACT_RATIO = 0.5


@dataclass(frozen=True)
class StackOptions:
    max_layers: int = 1
    compact_ratio: float = DEFAULT_COMPACT_RATIO
    state_dir: Path | None = None
    checksum: bool = False

    def __post_init__(self) -> None:
        if self.max_layers < 1:
            raise UsageError(f"--max-layers {self.max_layers}: the stack has at least one layer")
        if not self.compact_ratio > 0:
            raise UsageError(f"--compact-ratio {self.compact_ratio} must be above 0")
