"""HTTP front configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

import os
from dataclasses import dataclass

from svc_common.settings import api_keys_setting, setting, tls_cert_setting, tls_key_setting, validate_tls


@dataclass(slots=True)
class HttpConfig:
    port: int = setting(8000, env="FASTSWITCH_HTTP_PORT", help="HTTP port of the OpenAI API and /metrics")
    bind: str = setting("0.0.0.0", env="FASTSWITCH_HTTP_BIND", help="address the HTTP server binds")
    scheduler_addr: str = setting(
        "localhost:50051", flag="--scheduler", env="FASTSWITCH_SCHEDULER_ADDR", help="scheduler HOST:PORT"
    )
    served_model_name: str = setting(
        "", env="FASTSWITCH_SERVED_MODEL_NAME", help="the model id clients send (empty: the scheduler's model name)"
    )
    default_max_tokens: int = setting(
        256, env="FASTSWITCH_DEFAULT_MAX_TOKENS",
        help="max_tokens of a chat request that sets none (completions: 16, as OpenAI's)",
    )  # fmt: skip
    request_timeout_s: float = setting(
        600.0, flag="--request-timeout", env="FASTSWITCH_REQUEST_TIMEOUT_S",
        help="deadline of one generation on the scheduler, in seconds",
    )  # fmt: skip

    # Security (issue 13): the same key file and rules as the scheduler's (svc_common/auth.py).
    api_keys: str = api_keys_setting()
    tls_cert: str = tls_cert_setting()
    tls_key: str = tls_key_setting()
    scheduler_tls_ca: str = setting(
        "", env="FASTSWITCH_SCHEDULER_TLS_CA", metavar="FILE",
        help="PEM CA of the scheduler's certificate: the front reaches the scheduler over TLS",
    )  # fmt: skip

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"HTTP port out of range: {self.port}")
        if not self.scheduler_addr:
            raise ValueError("scheduler address is required")
        if self.default_max_tokens <= 0:
            raise ValueError(f"default max tokens must be > 0, got {self.default_max_tokens}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request timeout must be > 0, got {self.request_timeout_s}")
        validate_tls(self.tls_cert, self.tls_key)
        for path, flag in ((self.api_keys, "--api-keys"), (self.scheduler_tls_ca, "--scheduler-tls-ca")):
            if path and not os.path.isfile(path):
                raise ValueError(f"{flag} {path}: no such file")
