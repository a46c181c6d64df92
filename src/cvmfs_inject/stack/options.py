"""What a stacked inject is told (light: the CLI parser imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvmfs_inject.errors import UsageError

DEFAULT_COMPACT_RATIO = 0.5
MAX_LAYERS = 100  # schemas/batch-plan.json says the same; a runtime's overlay stops near 128


@dataclass(frozen=True)
class StackOptions:
    max_layers: int = 1
    compact_ratio: float = DEFAULT_COMPACT_RATIO
    state_dir: Path | None = None
    checksum: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_layers <= MAX_LAYERS:
            raise UsageError(f"--max-layers {self.max_layers}: from 1 to {MAX_LAYERS} layers")
        if not self.compact_ratio > 0:
            raise UsageError(f"--compact-ratio {self.compact_ratio} must be above 0")
