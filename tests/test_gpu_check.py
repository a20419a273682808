"""`make gpu-check` and the step microbenchmark, as far as a machine without a GPU can run them."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: gpu-check would run")
def test_gpu_check_without_a_gpu_says_so_exits_non_zero_and_writes_nothing(tmp_path: pathlib.Path) -> None:
    report = tmp_path / "gpu-report.md"
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no NVIDIA GPU" in proc.stderr
    assert not report.exists()


def test_a_failing_or_hanging_section_is_reported_as_failed() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    failed = gpu_check.run_step("fails", [sys.executable, "-c", "print('partial'); raise SystemExit(3)"], 30)
    assert not failed.ok and "partial" in failed.body and "exit code 3" in failed.body
    hung = gpu_check.run_step("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert not hung.ok and "stopped after 1 s" in hung.body
    fine = gpu_check.run_step("passes", [sys.executable, "-c", "print('done')"], 30)
    assert fine.ok and fine.body.strip() == "done"


def test_step_bench_times_decode_and_prefill_against_floors_from_the_same_run(tmp_path: pathlib.Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "vocab_size": 49152,
    }
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "executor_svc.bench_step", "--model", str(tmp_path / "m"), "--load-format", "dummy",
            "--batches", "1,4", "--context", "40", "--prefill", "64", "--repeats", "2", "--copy-mib", "16",
            "--matmul-n", "256", "--json", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTSWITCH_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["what"] for r in result["rows"]] == [
        "decode batch 1, context 40",
        "decode batch 4, context 40",
        "prefill 64 tokens",
    ]
    assert result["copy_bandwidth_gbps"] > 0 and result["matmul_peak_tflops"] > 0
    for row in result["rows"]:
        assert row["ms"] > 0 and row["floor_ms"] > 0
        assert row["ratio"] == pytest.approx(row["ms"] / row["floor_ms"])
    # The decode floor grows with the KV the batch reads; the weights are read once either way.
    assert result["rows"][1]["floor_ms"] > result["rows"][0]["floor_ms"]
    assert "x floor" in proc.stdout
