"""Executor configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

import os
from dataclasses import dataclass

from svc_common.settings import (
    bind_host_setting,
    drain_timeout_setting,
    setting,
    tls_cert_setting,
    tls_key_setting,
    validate_tls,
)


@dataclass(slots=True)
class ExecutorConfig:
    port: int = setting(50052, env="FASTSWITCH_EXECUTOR_PORT", help="executor port")
    model: str = setting("", env="FASTSWITCH_MODEL", help="HF directory or GGUF file (empty: SmolLM2-135M-Instruct)")
    block_size: int = setting(16, env="FASTSWITCH_BLOCK_SIZE", help="tokens per KV block (a power of two)")
    device_blocks: int = setting(1024, env="FASTSWITCH_DEVICE_BLOCKS", help="blocks in the device KV pool")
    device: str = setting("auto", env="FASTSWITCH_DEVICE", help="auto | cpu | cuda | cuda:N")
    threads: int = setting(0, env="FASTSWITCH_THREADS", help="torch intra-op threads on CPU (0: all cores)")
    host: str = bind_host_setting()
    tls_cert: str = tls_cert_setting()
    tls_key: str = tls_key_setting()
    drain_timeout_s: float = drain_timeout_setting()

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a positive power of two, got {self.block_size}")
        if self.device_blocks <= 0:
            raise ValueError(f"device blocks must be > 0, got {self.device_blocks}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        validate_tls(self.tls_cert, self.tls_key)
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0, got {self.drain_timeout_s}")

    @property
    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1
