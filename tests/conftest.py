"""Shared fixtures: the real default model, a reference `generate()`, and stacks started the way
`fastswitch up` starts them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from svc_common.stack import free_port_base

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real text prompts of varied length; batched together in the tests.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three primary colors:",
    "The theory of relativity states that",
    "To make a cup of tea, first",
    "import numpy as np\n\n# compute the mean of an array\n",
    "The quick brown fox",
    "Water boils at a temperature of",
    "In 1969, the first humans",
]

# A near-tie: the reference's top-2 logit gap at the first differing position is below this.
NEAR_TIE_LOGIT_GAP = 0.05


class FakeClock:
    """The scheduler's clock (request phases, conversation TTLs), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("scheduler_svc.sequence.clock", fake)
    return fake


def free_port() -> int:
    """One free loopback port (the HTTP front's; free_port_base finds the gRPC services' three)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir() -> str:
    from svc_common.model_source import resolve_model

    return str(resolve_model(None))


@pytest.fixture(scope="session")
def tokenizer(model_dir: str):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@dataclass
class Reference:
    """transformers `generate()` on the same model: the ground truth for greedy outputs."""

    model: object
    tokenizer: object

    def generate(self, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
        import torch

        kwargs = {"eos_token_id": None} if ignore_eos else {}
        out = self.model.generate(  # type: ignore[attr-defined]
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id,  # type: ignore[attr-defined]
            **kwargs,
        )
        return out[0, len(prompt_ids) :].tolist()

    def top2_gap(self, ids: list[int]) -> float:
        """Logit gap between the two most likely next tokens after `ids`."""
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([ids])).logits[0, -1]  # type: ignore[operator]
        top = torch.topk(logits.float(), 2).values
        return float(top[0] - top[1])

    def check(self, prompt_ids: list[int], got: list[int], max_new_tokens: int, ignore_eos: bool = False) -> str:
        """'match', or 'near-tie' when the first difference is a numerical near-tie; fails otherwise."""
        want = self.generate(prompt_ids, max_new_tokens, ignore_eos)
        if got == want:
            return "match"
        i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        gap = self.top2_gap(prompt_ids + want[:i])
        assert gap < NEAR_TIE_LOGIT_GAP, (
            f"output differs from generate() at token {i} where the reference is not a near-tie "
            f"(top-2 logit gap {gap:.4f}):\n got={got}\nwant={want}"
        )
        return "near-tie"


@pytest.fixture(scope="session")
def reference(model_dir: str, tokenizer) -> Reference:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Reference(model, tokenizer)


def wait_idle(client: object, timeout_s: float = 30.0) -> dict[str, float]:
    """The stack's stats once no request is live or queued and no copy is in flight; fails on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()  # type: ignore[attr-defined]
        busy = {k: stats.get(k, 0) for k in ("live_requests", "running", "waiting", "swaps_in_flight")}
        if not any(busy.values()):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the stack is still busy after {timeout_s:.0f}s: {busy}")
        time.sleep(0.05)


def start_stack(**overrides: object) -> Iterator[object]:
    from svc_common.stack import Stack, StackConfig

    # Identity with generate() holds in fp32; on a GPU `auto` would pick bf16 (compared by agreement).
    overrides.setdefault("dtype", "float32")
    config = StackConfig.build(port=free_port_base(int(overrides.get("executors", 1))), **overrides)  # type: ignore[call-overload]
    log_dir = tempfile.mkdtemp(prefix="fastswitch-test-")
    stack = Stack(config, log_dir=log_dir)
    stack.start(timeout_s=300)
    try:
        yield stack
    finally:
        stack.stop()


running_stack = contextlib.contextmanager(start_stack)


@pytest.fixture(scope="session")
def stack(model_dir: str) -> Iterator[object]:
    """The default stack (swap daemon included), started through the same code as `fastswitch up`."""
    yield from start_stack(device_blocks=256, host_blocks=256)


@pytest.fixture(scope="session")
def tiny_pool_stack(model_dir: str) -> Iterator[object]:
    """A stack whose device pool is so small that concurrent requests must be preempted."""
    yield from start_stack(device_blocks=12, host_blocks=0, max_step_tokens=64)


@pytest.fixture(scope="session")
def spill_stack(model_dir: str) -> Iterator[object]:
    """A small device pool with a host pool: idle conversations' KV must move to the host."""
    yield from start_stack(device_blocks=12, host_blocks=64, max_step_tokens=64)


def make_certificate(directory: str, name: str = "server") -> tuple[str, str]:
    """A real self-signed certificate (and key) for localhost and 127.0.0.1, made with openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH: cannot make a test certificate")
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def serve_in_thread(add_servicer: Callable[[grpc.aio.Server], None], **server_kwargs: object) -> Iterator[str]:
    """A grpc.aio server on its own thread and event loop, so that blocking test code can call it; yields
    its address. `add_servicer(server)` registers the servicers (e.g. a fake executor)."""
    port, ready, stop = free_port(), threading.Event(), asyncio.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        server = grpc.aio.server(**server_kwargs)  # type: ignore[arg-type]
        add_servicer(server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the test server did not start"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
