"""Executor configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from svc_common.settings import (
    bind_host_setting,
    drain_timeout_setting,
    is_host_port,
    setting,
    tls_cert_setting,
    tls_key_setting,
    validate_tls,
)

DTYPES = ("auto", "bfloat16", "float16", "float32")
LOAD_FORMATS = ("auto", "dummy")
ATTENTION_BACKENDS = ("sdpa", "triton")
CPU_LINEAR = ("onednn", "dense")
FUSED_OPS = ("auto", "on", "off")
CPU_DEFAULT_BLOCKS = 1024  # --device-blocks 0 on a CPU: a fixed pool (nothing to size it from)


@dataclass(slots=True)
class ExecutorConfig:
    port: int = setting(50052, env="FASTSWITCH_EXECUTOR_PORT", help="executor port")
    model: str = setting("", env="FASTSWITCH_MODEL", help="HF directory or GGUF file (empty: SmolLM2-135M-Instruct)")
    block_size: int = setting(16, env="FASTSWITCH_BLOCK_SIZE", help="tokens per KV block (a power of two)")
    device_blocks: int = setting(
        0, env="FASTSWITCH_DEVICE_BLOCKS",
        help=f"blocks in the device KV pool (0: sized from free GPU memory on CUDA, {CPU_DEFAULT_BLOCKS} on CPU)",
    )  # fmt: skip
    device: str = setting("auto", env="FASTSWITCH_DEVICE", help="auto | cpu | cuda | cuda:N")
    threads: int = setting(0, env="FASTSWITCH_THREADS", help="torch intra-op threads on CPU (0: all cores)")
    cpu_linear: str = setting(
        "onednn", env="FASTSWITCH_CPU_LINEAR", choices=CPU_LINEAR,
        help="linear layers on a CPU: onednn (weights packed once at load, fast) or dense (F.linear, as loaded)",
    )  # fmt: skip
    dtype: str = setting(
        "auto", env="FASTSWITCH_DTYPE", choices=DTYPES,
        help="weights and KV dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )  # fmt: skip
    load_format: str = setting(
        "auto", env="FASTSWITCH_LOAD_FORMAT", choices=LOAD_FORMATS,
        help="dummy: random weights from the model directory's config.json (timing real architectures)",
    )  # fmt: skip
    gpu_memory_utilization: float = setting(
        0.9, env="FASTSWITCH_GPU_MEMORY_UTILIZATION",
        help="share of the GPU's memory this executor may use when --device-blocks is 0",
    )  # fmt: skip
    attention: str = setting(
        "sdpa", env="FASTSWITCH_ATTENTION", choices=ATTENTION_BACKENDS,
        help="sdpa: torch, gathers KV (the CPU path); triton: kernels over the paged pool in place (GPU; opt-in)",
    )  # fmt: skip
    cuda_graphs: bool = setting(
        False, env="FASTSWITCH_CUDA_GRAPHS",
        help="replay decode steps from CUDA graphs per batch-size bucket (needs CUDA and --attention triton; opt-in)",
    )  # fmt: skip
    fused_ops: str = setting(
        "auto", env="FASTSWITCH_FUSED_OPS", choices=FUSED_OPS,
        help="merged QKV and gate/up products, RMSNorm, rotary and SiLU x up as one kernel each (Triton); "
        "auto: on for bfloat16/float16 on CUDA; on: also elsewhere (a CPU runs the kernels interpreted: tests)",
    )  # fmt: skip
    host: str = bind_host_setting()
    tls_cert: str = tls_cert_setting()
    tls_key: str = tls_key_setting()
    drain_timeout_s: float = drain_timeout_setting()
    # Joining a scheduler by itself (scheduler --accept-nodes): executor_svc/register.py.
    register_with: str = setting(
        "", env="FASTSWITCH_REGISTER_WITH", metavar="HOST:PORT",
        help="the scheduler this node joins once its model is loaded (and again every 10 s: a restarted "
        "scheduler learns it back); empty: the scheduler lists the node itself (--executor)",
    )  # fmt: skip
    advertise: str = setting(
        "", env="FASTSWITCH_ADVERTISE", metavar="HOST:PORT[,SWAPD_HOST:PORT]",
        help="this node as the scheduler (and the other nodes' swap daemons) reach it: the executor and, after a "
        "comma, its swap daemon (empty: this host's name and --port, no swap daemon)",
    )  # fmt: skip
    register_api_key: str = setting(
        "", env="FASTSWITCH_REGISTER_API_KEY", metavar="KEY", help="an admin key of the scheduler (its --api-keys)"
    )
    register_tls_ca: str = setting(
        "", env="FASTSWITCH_REGISTER_TLS_CA", metavar="FILE", help="PEM CA of the scheduler's certificate (TLS)"
    )

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a positive power of two, got {self.block_size}")
        if self.device_blocks < 0:
            raise ValueError(f"device blocks must be >= 0 (0: size the pool automatically), got {self.device_blocks}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"GPU memory utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_linear not in CPU_LINEAR:
            raise ValueError(f"cpu linear must be one of {', '.join(CPU_LINEAR)}, got {self.cpu_linear!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.fused_ops not in FUSED_OPS:
            raise ValueError(f"fused ops must be one of {', '.join(FUSED_OPS)}, got {self.fused_ops!r}")
        if self.cuda_graphs and self.attention != "triton":
            raise ValueError("--cuda-graphs needs --attention triton (the sdpa path gathers padded KV per step)")
        validate_tls(self.tls_cert, self.tls_key)
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0, got {self.drain_timeout_s}")
        if self.register_with and not is_host_port(self.register_with):
            raise ValueError(f"--register-with must be HOST:PORT, got {self.register_with!r}")
        if self.advertise and not all(is_host_port(p.strip()) for p in self.advertise.split(",", 1)):
            raise ValueError(f"--advertise must be HOST:PORT or HOST:PORT,SWAPD_HOST:PORT, got {self.advertise!r}")
        if self.register_tls_ca and not os.path.isfile(self.register_tls_ca):
            raise ValueError(f"--register-tls-ca {self.register_tls_ca}: no such file")

    @property
    def advertised(self) -> tuple[str, str]:
        """(executor, swap daemon) as the scheduler reaches this node."""
        executor, _, swapd = (self.advertise or f"{socket.getfqdn()}:{self.port}").partition(",")
        return executor.strip(), swapd.strip()

    @property
    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1
