"""Scheduler configuration: one dataclass, validated with ValueError."""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("fcfs", "priority", "vtc")
PREEMPTION_MODES = ("swap", "recompute", "vllm-like")
PRIORITY_UPDATES = ("none", "random", "markov")


@dataclass(slots=True)
class SchedulerConfig:
    port: int = 50051
    executor_addr: str = "localhost:50052"
    swapd_addr: str = ""  # empty: no swap daemon (preemption recomputes)
    model: str = ""  # for the tokenizer: same value as the executor's --model
    policy: str = "fcfs"
    preemption: str = "swap"
    max_running: int = 64  # batch-size cap: requests in the running set
    max_step_tokens: int = 256  # token budget per step (decodes + prefill chunks)
    executor_timeout_s: float = 120.0  # fail live requests if no executor for this long
    priority_updates: str = "none"  # the paper's run-time priority changes: none | random | markov
    priority_update_prob: float = 0.0  # per live request, per iteration
    priority_levels: int = 4
    seed: int = 0
    conversation_ttl_s: float = 600.0  # kept KV of an idle conversation is dropped after this
    conversation_host_blocks: int = 0  # host blocks that kept conversation KV may hold (0: the whole host pool)
    # FastSwitch's three mechanisms, each switchable alone (the benchmark's ablations). `vllm-like`
    # preemption turns all three off.
    block_groups: bool = True  # one copy per contiguous run of blocks (off: one per block per layer)
    async_swaps: bool = True  # copies overlap compute (off: the step loop waits for them)
    kv_reuse: bool = True  # keep conversation KV across turns and host copies across swaps
    vtc_prompt_price: float = 1.0  # VTC service per prompt token
    vtc_gen_price: float = 2.0  # VTC service per generated token
    tenant_weights: dict[str, float] = field(default_factory=dict)  # VTC weights (default 1.0)

    @property
    def copy_granularity(self) -> str:
        return "run" if self.block_groups and self.preemption != "vllm-like" else "block_layer"

    @property
    def swaps_stall(self) -> bool:
        return not self.async_swaps or self.preemption == "vllm-like"

    @property
    def reuse(self) -> bool:
        return self.kv_reuse and self.preemption != "vllm-like"

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption!r}")
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
        if self.conversation_host_blocks < 0:
            raise ValueError(f"conversation host blocks must be >= 0, got {self.conversation_host_blocks}")
        if not self.executor_addr:
            raise ValueError("executor address is required")
