"""Swap daemon configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "cpu", "cuda")


@dataclass(slots=True)
class SwapDaemonConfig:
    port: int = 50053
    host_blocks: int = 4096  # blocks in the host pool; its bytes are fixed by the first Attach
    workers: int = 2  # memcpy threads (cpu) or copy streams (cuda)
    backend: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.host_blocks <= 0:
            raise ValueError(f"host blocks must be > 0, got {self.host_blocks}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be in 1..64, got {self.workers}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {'|'.join(BACKENDS)}, got {self.backend!r}")
