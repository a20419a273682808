"""Scheduler configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

import os
from dataclasses import dataclass

from scheduler_svc.vtc import check_prices
from svc_common.settings import (
    api_keys_setting,
    bind_host_setting,
    drain_timeout_setting,
    is_host_port,
    setting,
    tls_cert_setting,
    tls_key_setting,
    validate_tls,
)
from svc_common.swap import Granularity

POLICIES = ("fcfs", "priority", "vtc")
PREEMPTION_MODES = ("swap", "recompute", "vllm-like")
MIGRATION_MODES = ("host", "recompute", "off")  # scheduler_svc/migration.py
DEFAULT_EXECUTOR = "localhost:50052"  # the node of a scheduler given none
PRIORITY_UPDATES = ("none", "random", "markov")


def _tenant_weight(item: str) -> tuple[str, float]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"tenant weight {item!r} must look like TENANT=WEIGHT")
    return name.strip(), float(value)


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """Where one executor node is reached: its executor and (optionally) the swap daemon beside it."""

    executor: str
    swapd: str = ""

    @classmethod
    def parse(cls, text: str) -> NodeAddress:
        """`HOST:PORT` or `HOST:PORT,SWAPD_HOST:PORT`; ValueError says what is wrong."""
        parts = [p.strip() for p in text.split(",")]
        if not 1 <= len(parts) <= 2 or not all(is_host_port(p) for p in parts):
            raise ValueError(f"executor node {text!r} must look like HOST:PORT or HOST:PORT,SWAPD_HOST:PORT")
        return cls(parts[0], parts[1] if len(parts) == 2 else "")

    def __str__(self) -> str:
        return f"{self.executor},{self.swapd}" if self.swapd else self.executor


@dataclass(slots=True)
class SchedulerConfig:
    port: int = setting(50051, env="FASTSWITCH_PORT", help="client API port")
    executor_addr: list[str] = setting(
        default_factory=list, flag="--executor", env="FASTSWITCH_EXECUTOR_ADDR", many=True,
        metavar="HOST:PORT[,SWAPD_HOST:PORT]",
        help="an executor node: its executor and, after a comma, the swap daemon beside it; one flag per node "
        f"(none: {DEFAULT_EXECUTOR}, unless --accept-nodes)",
    )  # fmt: skip
    accept_nodes: bool = setting(
        False, env="FASTSWITCH_ACCEPT_NODES",
        help="executor nodes may join by registering themselves (executor --register-with; an admin key when "
        "--api-keys is set), beside any --executor",
    )  # fmt: skip
    swapd_addr: str = setting(
        "", flag="--swapd", env="FASTSWITCH_SWAPD_ADDR",
        help="swap daemon HOST:PORT of a single --executor that names none (empty: none; preemption recomputes)",
    )  # fmt: skip
    model: str = setting(
        "", env="FASTSWITCH_MODEL", help="HF directory or GGUF file (empty: SmolLM2-135M-Instruct); the executor's too"
    )
    policy: str = setting("fcfs", env="FASTSWITCH_POLICY", choices=POLICIES, help="queue order")
    preemption: str = setting(
        "swap", env="FASTSWITCH_PREEMPTION", choices=PREEMPTION_MODES, help="what happens to a preempted request's KV"
    )
    migration: str = setting(
        "host", env="FASTSWITCH_MIGRATION", choices=MIGRATION_MODES,
        help="how a queued request holding KV moves to an idle node: host (its KV through the host tier), "
        "recompute (dropped, recomputed there), off (it stays)",
    )  # fmt: skip
    max_running: int = setting(64, env="FASTSWITCH_MAX_RUNNING", help="batch-size cap: requests in the running set")
    max_step_tokens: int = setting(
        256, env="FASTSWITCH_MAX_STEP_TOKENS", help="token budget per step (decodes + prefill chunks)"
    )
    executor_timeout_s: float = setting(
        120.0, flag="--executor-timeout", env="FASTSWITCH_EXECUTOR_TIMEOUT_S",
        help="seconds without an executor before live requests fail",
    )  # fmt: skip
    priority_updates: str = setting(
        "none", env="FASTSWITCH_PRIORITY_UPDATES", choices=PRIORITY_UPDATES,
        help="the paper's run-time priority changes",
    )  # fmt: skip
    priority_update_prob: float = setting(
        0.0, env="FASTSWITCH_PRIORITY_UPDATE_PROB", help="per live request, per iteration"
    )
    priority_levels: int = setting(4, env="FASTSWITCH_PRIORITY_LEVELS", help="priorities the update driver draws from")
    seed: int = setting(0, env="FASTSWITCH_SEED", help="seed of the priority-update driver")
    conversation_ttl_s: float = setting(
        600.0, flag="--conversation-ttl", env="FASTSWITCH_CONVERSATION_TTL_S",
        help="seconds an idle conversation's KV and history are kept",
    )  # fmt: skip
    max_conversations: int = setting(
        10_000, env="FASTSWITCH_MAX_CONVERSATIONS",
        help="conversations kept at once (history and KV); the least recently used idle one goes first",
    )  # fmt: skip
    conversation_host_blocks: int = setting(
        0, env="FASTSWITCH_CONVERSATION_HOST_BLOCKS",
        help="host blocks that idle conversations' KV may hold (0: the whole host pool)",
    )  # fmt: skip
    # FastSwitch's three mechanisms, each switchable alone (the benchmark's ablations). `vllm-like`
    # preemption turns all three off.
    block_groups: bool = setting(
        True, flag="--no-block-groups", negate=True, env="FASTSWITCH_NO_BLOCK_GROUPS",
        help="ablation: one copy per block per layer instead of one per contiguous run of blocks",
    )  # fmt: skip
    async_swaps: bool = setting(
        True, flag="--sync-swaps", negate=True, env="FASTSWITCH_SYNC_SWAPS",
        help="ablation: the step loop waits for every copy to land",
    )  # fmt: skip
    kv_reuse: bool = setting(
        True, flag="--no-kv-reuse", negate=True, env="FASTSWITCH_NO_KV_REUSE",
        help="ablation: no conversation KV across turns, no host copies across swaps",
    )  # fmt: skip
    lookahead: bool = setting(
        True, flag="--no-lookahead", negate=True, env="FASTSWITCH_NO_LOOKAHEAD",
        help="one plan at a time: do not plan the next decode step while one runs (at most two in flight)",
    )  # fmt: skip
    vtc_prompt_price: float = setting(1.0, env="FASTSWITCH_VTC_PROMPT_PRICE", help="VTC service per prompt token")
    vtc_gen_price: float = setting(2.0, env="FASTSWITCH_VTC_GEN_PRICE", help="VTC service per generated token")
    metrics_port: int = setting(
        0, env="FASTSWITCH_METRICS_PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: off; the HTTP front's /metrics has them too)",
    )  # fmt: skip
    metrics_tenants: int = setting(
        16, env="FASTSWITCH_METRICS_TENANTS",
        help="tenants with a metrics label of their own (the first ones served); later ones count as 'other'",
    )  # fmt: skip
    tenant_weights: dict[str, float] = setting(
        default_factory=dict, flag="--tenant-weight", env="FASTSWITCH_TENANT_WEIGHTS", item=_tenant_weight,
        metavar="TENANT=WEIGHT", help="VTC weight of a tenant (default 1)",
    )  # fmt: skip
    # Security, admission and lifecycle (issue 13).
    host: str = bind_host_setting()
    tls_cert: str = tls_cert_setting()
    tls_key: str = tls_key_setting()
    link_tls_ca: str = setting(
        "", env="FASTSWITCH_LINK_TLS_CA", metavar="FILE",
        help="PEM CA that signed the executor's and swap daemon's certificates: the links to them use TLS",
    )  # fmt: skip
    api_keys: str = api_keys_setting()
    max_waiting: int = setting(
        1024, env="FASTSWITCH_MAX_WAITING", help="queued requests before new ones get RESOURCE_EXHAUSTED"
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, env="FASTSWITCH_MAX_MESSAGE_BYTES", help="largest client request accepted, in bytes"
    )
    drain_timeout_s: float = drain_timeout_setting()
    step_timeout_s: float = setting(
        120.0, flag="--step-timeout", env="FASTSWITCH_STEP_TIMEOUT_S",
        help="seconds one step may take before the executor counts as lost",
    )  # fmt: skip

    @property
    def nodes(self) -> list[NodeAddress]:
        """The executor nodes, in the order given (`--swapd` completes a single node that names no daemon)."""
        listed = self.executor_addr or ([] if self.accept_nodes else [DEFAULT_EXECUTOR])
        nodes = [NodeAddress.parse(text) for text in listed]
        if len(nodes) == 1 and not nodes[0].swapd and self.swapd_addr:
            nodes[0] = NodeAddress(nodes[0].executor, self.swapd_addr)
        return nodes

    @property
    def copy_granularity(self) -> Granularity:
        return Granularity.RUN if self.block_groups and self.preemption != "vllm-like" else Granularity.BLOCK_LAYER

    @property
    def swaps_stall(self) -> bool:
        return not self.async_swaps or self.preemption == "vllm-like"

    @property
    def reuse(self) -> bool:
        return self.kv_reuse and self.preemption != "vllm-like"

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption!r}")
        if self.migration not in MIGRATION_MODES:
            raise ValueError(f"migration must be one of {', '.join(MIGRATION_MODES)}, got {self.migration!r}")
        if self.max_running <= 0:
            raise ValueError(f"max running requests must be > 0, got {self.max_running}")
        if self.max_step_tokens < self.max_running:
            raise ValueError(
                f"max step tokens ({self.max_step_tokens}) must be >= max running ({self.max_running}) "
                "so that every running request can decode in one step"
            )
        if self.priority_updates not in PRIORITY_UPDATES:
            raise ValueError(f"priority updates must be one of {', '.join(PRIORITY_UPDATES)}")
        if not 0.0 <= self.priority_update_prob <= 1.0:
            raise ValueError(f"priority update probability must be in [0, 1], got {self.priority_update_prob}")
        if self.priority_levels < 1:
            raise ValueError(f"priority levels must be >= 1, got {self.priority_levels}")
        if self.conversation_ttl_s <= 0:
            raise ValueError(f"conversation TTL must be > 0 seconds, got {self.conversation_ttl_s}")
        if self.max_conversations < 1:
            raise ValueError(f"max conversations must be >= 1, got {self.max_conversations}")
        check_prices(self.vtc_prompt_price, self.vtc_gen_price, self.tenant_weights)
        if self.conversation_host_blocks < 0:
            raise ValueError(f"conversation host blocks must be >= 0, got {self.conversation_host_blocks}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics port out of range: {self.metrics_port}")
        if self.metrics_tenants < 0:
            raise ValueError(f"metrics tenants must be >= 0, got {self.metrics_tenants}")
        nodes = self.nodes  # raises ValueError for a malformed address
        if len({n.executor for n in nodes}) != len(nodes):
            raise ValueError("an executor is named twice: give each node once")
        if self.swapd_addr and len(nodes) > 1:
            raise ValueError("--swapd names the daemon of a single node; with several, write --executor EXEC,SWAPD")
        validate_tls(self.tls_cert, self.tls_key)
        if self.link_tls_ca and not os.path.isfile(self.link_tls_ca):
            raise ValueError(f"--link-tls-ca {self.link_tls_ca}: no such file")
        if self.api_keys and not os.path.isfile(self.api_keys):
            raise ValueError(f"--api-keys {self.api_keys}: no such file")
        if self.max_waiting <= 0:
            raise ValueError(f"max waiting must be > 0, got {self.max_waiting}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max message bytes must be >= 1024, got {self.max_message_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0, got {self.drain_timeout_s}")
        if self.step_timeout_s <= 0:
            raise ValueError(f"step timeout must be > 0, got {self.step_timeout_s}")
