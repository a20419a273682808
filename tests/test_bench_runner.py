"""A bench run end to end: its inputs checked before any stack starts, every output written, each
request's phases kept in requests.json and the tails explained in results.md (against a fake server),
and a smoke run of the tiny preset on the real model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from fastswitch.cli import build_parser
from fastswitch_bench import replay as replay_module
from fastswitch_bench.presets import PRESETS
from fastswitch_bench.replay import PHASES
from fastswitch_bench.report import markdown
from fastswitch_bench.runner import main, run
from fastswitch_bench.workload import generate

REPORTED_KEYS = {
    "ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "tbt_p50", "tbt_p95", "tbt_p99", "tbt_p999",
    "throughput_tok_s", "preemptions", "swap_bytes", "copy_calls", "swap_stall_s", "generated_tokens", "wall_s",
    "later_ttft_p50", "later_ttft_p99", "reused_prefix_tokens", "ratios_vs_vllm_like", "tails",
}  # fmt: skip


def test_unknown_modes_are_rejected_with_the_valid_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown modes.*fastswitch"):
        run("tiny", ["warp-speed"], tmp_path)


def test_bench_flags_become_the_model_options(monkeypatch, tmp_path) -> None:
    from fastswitch_bench import runner

    seen = {}

    def prepare(*args, options, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["options"] = options
        raise ValueError("stop here")

    monkeypatch.setattr(runner, "prepare", prepare)
    argv = ["bench", "--model", "/m", "--dtype", "bfloat16", "--load-format", "dummy", "--executors", "2"]
    assert main(build_parser().parse_args([*argv, "--out", str(tmp_path)])) == 2
    assert seen["options"] == runner.ModelOptions("/m", "bfloat16", "dummy", 2)
    monkeypatch.undo()
    plain = build_parser().parse_args(["bench"])
    assert (plain.model, plain.dtype, plain.load_format, plain.executors) == (None, None, None, None)  # not given


def test_a_missing_model_is_an_error_before_anything_runs(tmp_path, capsys) -> None:
    args = build_parser().parse_args(["bench", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class FakeServer:
    """Stands in for `AsyncClient`: streams one token per chunk and sends the request's phases on the last.

    Turn 2 of conversation SLOW_TTFT waits before its first token (and says it was preempted); turn 1 of
    SLOW_GAP pauses once mid-stream (and says it waited for a swap-in). With `phases=False` it is a server
    that predates phases."""

    SLOW_TTFT, SLOW_GAP = "c0001", "c0002"
    phases = True

    def __init__(self, addr: str) -> None:
        self.turns: dict[str, int] = {}

    async def __aenter__(self) -> FakeServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def complete(self, prompt: str, **_: object) -> None:
        return None

    async def stats(self) -> dict[str, float]:
        return {"preemptions": 0.0, "device_blocks_free": 12}

    async def end_conversation(self, conversation_id: str, tenant: str = "") -> None:
        return None

    async def generate(self, prompt: str, *, conversation_id: str, max_tokens: int, **_: object):  # noqa: ANN201
        turn = self.turns[conversation_id] = self.turns.get(conversation_id, 0) + 1
        seconds = dict.fromkeys(PHASES, 0.0) | {"queued": 0.001, "prefill": 0.002, "decode": 0.001 * max_tokens}
        if conversation_id.endswith(self.SLOW_TTFT) and turn == 2:
            await asyncio.sleep(0.5)  # long enough that no scheduling hiccup of a loaded machine outdoes it
            seconds["preempted"] = 0.5
        for i in range(max_tokens):
            if conversation_id.endswith(self.SLOW_GAP) and turn == 1 and i == 2:
                await asyncio.sleep(0.4)
                seconds["swap_in"] = 0.3
            await asyncio.sleep(0)
            yield SimpleNamespace(token_ids=[7], prompt_tokens=9, reused_prefix_tokens=0, phases=None)
        yield SimpleNamespace(
            token_ids=[], prompt_tokens=9, reused_prefix_tokens=0, phases=seconds if self.phases else None
        )


@pytest.fixture
def tiny_workload(tmp_path) -> str:
    """The tiny preset's workload cut by words, saved: a replay against a fake server needs no model at all."""
    path = tmp_path / "tiny.json"
    generate(PRESETS["tiny"].workload).save(path)
    return str(path)


def test_requests_json_keeps_each_requests_phases_and_the_report_explains_the_tails(
    tmp_path, monkeypatch, tiny_workload
) -> None:
    monkeypatch.setattr(replay_module, "AsyncClient", FakeServer)
    results = run("tiny", ["fastswitch"], tmp_path, addr="fake:1", workload_path=tiny_workload, progress=False)
    requests = json.loads((tmp_path / "requests.json").read_text())["fastswitch"]
    assert len(requests) == results["workload"]["summary"]["requests"]
    assert all(list(r["phases"]) == list(PHASES) for r in requests)
    slow = next(r for r in requests if r["conversation"] == FakeServer.SLOW_TTFT and r["turn"] == 2)
    assert slow["phases"]["preempted"] == 0.5

    tails = json.loads((tmp_path / "results.json").read_text())["modes"]["fastswitch"]["tails"]
    assert (tails["ttft_p99"]["conversation"], tails["ttft_p99"]["turn"]) == (FakeServer.SLOW_TTFT, 2)
    assert tails["ttft_p99"]["went_to"] == "preempted"
    assert (tails["tbt_p999"]["conversation"], tails["tbt_p999"]["went_to"]) == (FakeServer.SLOW_GAP, "swap_in")
    report = (tmp_path / "results.md").read_text()
    assert f"| fastswitch | TTFT p99 | {FakeServer.SLOW_TTFT} turn 2 |" in report
    rows = [line for line in report.splitlines() if line.startswith("| fastswitch | T")]
    assert [row.rsplit(" | ", 1)[1] for row in rows] == ["**preempted** |", "**swap_in** |"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tail_phases.png").stat().st_size > 1000


def test_a_server_without_phases_leaves_them_null_and_the_report_says_so(tmp_path, monkeypatch, tiny_workload) -> None:
    monkeypatch.setattr(replay_module, "AsyncClient", type("OldServer", (FakeServer,), {"phases": False}))
    run("tiny", ["fastswitch"], tmp_path, addr="fake:1", workload_path=tiny_workload, progress=False)
    requests = json.loads((tmp_path / "requests.json").read_text())["fastswitch"]
    assert requests and all(r["phases"] is None for r in requests)
    assert "No per-request phases from the server in fastswitch" in (tmp_path / "results.md").read_text()


class HangingServer(FakeServer):
    """Stops sending tokens in the middle of conversation SLOW_TTFT's first turn."""

    async def generate(self, prompt: str, *, conversation_id: str, max_tokens: int, **kw: object):  # noqa: ANN201
        async for chunk in super().generate(prompt, conversation_id=conversation_id, max_tokens=max_tokens, **kw):
            yield chunk
            if conversation_id.endswith(self.SLOW_TTFT):
                await asyncio.sleep(3600)


def test_the_watchdog_cuts_a_stalled_replay_short_and_the_report_says_so(tmp_path, monkeypatch, tiny_workload) -> None:
    monkeypatch.setattr(replay_module, "AsyncClient", HangingServer)
    results = run("tiny", ["fastswitch"], tmp_path, "fake:1", tiny_workload, progress=False, stall_timeout_s=0.5)
    m = results["modes"]["fastswitch"]
    assert m["stalled"] and "STALLED" in m["notes"]
    requests = json.loads((tmp_path / "requests.json").read_text())["fastswitch"]
    hung = [r for r in requests if r["conversation"] == HangingServer.SLOW_TTFT]
    assert [(r["turn"], r["tokens"], r["error"][:8]) for r in hung] == [(1, 1, "stalled:")]
    assert m["failed_requests"] == 1 and m["unfinished_requests"] == 2  # the hung turn and the one never sent
    assert "the server stalled; replay cut short" in (tmp_path / "results.md").read_text()


@pytest.mark.model  # the default model's tokenizer
def test_a_config_only_model_directory_borrows_the_default_tokenizer(tmp_path) -> None:
    from fastswitch_bench.runner import load_tokenizer
    from svc_common.model_source import resolve_model

    (tmp_path / "config.json").write_text("{}")
    tokenizer, name = load_tokenizer(tmp_path)
    assert name == resolve_model(None).name and tokenizer("Hello")["input_ids"]


@pytest.mark.slow
@pytest.mark.model
def test_tiny_preset_runs_two_modes_and_writes_every_output(tmp_path) -> None:
    results = run("tiny", ["fastswitch", "vllm-like"], tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"modes", "workload", "machine"}
    expected_tokens = saved["workload"]["summary"]["total_output_tokens"]
    for mode in ("fastswitch", "vllm-like"):
        m = saved["modes"][mode]
        assert REPORTED_KEYS <= set(m), mode
        assert m["failed_requests"] == 0, mode
        assert m["generated_tokens"] == expected_tokens, mode  # ignore_eos: every mode, the same tokens
        assert m["throughput_tok_s"] > 0 and m["later_ttft_p50"] is not None
    assert saved["modes"]["vllm-like"]["ratios_vs_vllm_like"]["ttft_p99"] == pytest.approx(1.0)
    ours, theirs = saved["modes"]["fastswitch"], saved["modes"]["vllm-like"]
    assert ours["ratios_vs_vllm_like"]["ttft_p99"] == pytest.approx(theirs["ttft_p99"] / ours["ttft_p99"])
    assert saved["modes"]["fastswitch"]["reused_prefix_tokens"] > 0  # later turns reuse their conversation's KV
    assert saved["modes"]["vllm-like"]["reused_prefix_tokens"] == 0
    requests = json.loads((tmp_path / "requests.json").read_text())
    assert len(requests["fastswitch"]) == saved["workload"]["summary"]["requests"]
    from fastswitch.client import TokenChunk

    if "phases" in TokenChunk.__dataclass_fields__:  # once the SDK carries them, every stack request has them
        assert all(list(r["phases"]) == list(PHASES) for m in requests.values() for r in m)
    assert "| fastswitch |" in (tmp_path / "results.md").read_text()
    for name in ("ttft_cdf.png", "tbt_cdf.png", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert markdown(results) == (tmp_path / "results.md").read_text()
    # the saved workload replays exactly (the next run's workload.json is the same file)
    from fastswitch_bench.workload import Workload

    assert Workload.load(tmp_path / "workload.json").num_requests == saved["workload"]["summary"]["requests"]
