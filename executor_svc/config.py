"""Executor configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(slots=True)
class ExecutorConfig:
    model: str = ""  # HF directory or GGUF file; empty = default SmolLM2-135M-Instruct
    port: int = 50052
    block_size: int = 16
    num_blocks: int = 1024
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = all cores

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a positive power of two, got {self.block_size}")
        if self.num_blocks <= 0:
            raise ValueError(f"device blocks must be > 0, got {self.num_blocks}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    @property
    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1
