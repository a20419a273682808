"""Swap daemon configuration: one dataclass, validated with ValueError."""

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

BACKENDS = ("auto", "cpu", "cuda")


@dataclass(slots=True)
class SwapDaemonConfig:
    port: int = setting(50053, env="FASTSWITCH_SWAPD_PORT", help="swap daemon port")
    host_blocks: int = setting(
        4096, env="FASTSWITCH_HOST_BLOCKS",
        help="blocks in the host swap pool (their bytes follow the executor's block size)",
    )  # fmt: skip
    workers: int = setting(2, env="FASTSWITCH_SWAPD_WORKERS", help="memcpy threads (cpu) or copy streams (cuda)")
    backend: str = setting("auto", env="FASTSWITCH_SWAPD_BACKEND", choices=BACKENDS, help="copy engine")
    host: str = bind_host_setting()
    tls_cert: str = tls_cert_setting()
    tls_key: str = tls_key_setting()
    link_tls_ca: str = setting(
        "", env="FASTSWITCH_SWAPD_LINK_TLS_CA", metavar="FILE",
        help="PEM CA that signed the other nodes' swap daemons' certificates: pulls from them (migration) use TLS",
    )  # fmt: skip
    drain_timeout_s: float = drain_timeout_setting()

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
        validate_tls(self.tls_cert, self.tls_key)
        if self.link_tls_ca and not os.path.isfile(self.link_tls_ca):
            raise ValueError(f"--link-tls-ca {self.link_tls_ca}: no such file")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0, got {self.drain_timeout_s}")
