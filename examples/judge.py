"""Score the shipped response pairs with the branch-and-rethink judge (`fastswitch.judge`).

    python examples/judge.py                      # starts a local stack, scores, stops it
    python examples/judge.py --addr HOST:PORT     # uses a running stack (`fastswitch up`)
    python examples/judge.py --model PATH         # a local stack on another model (HF directory or GGUF)
    python examples/judge.py --unconstrained      # the prompts alone, without structured output

Each pair is judged in two turns of one conversation; turn 2 reuses turn 1's KV on the server. Both
turns are grammar-constrained on the server (turn 1's `Dimensions:` line, turn 2's single boxed
verdict) unless --unconstrained. Malformed verdicts are reported as such and left out of the
accuracy, never guessed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
from collections.abc import Iterator

from fastswitch.client import Client
from fastswitch.judge import JudgePair, JudgeResult, judge

PAIRS = pathlib.Path(__file__).with_name("judge_pairs.json")


def load_pairs(path: pathlib.Path) -> list[JudgePair]:
    return [JudgePair.from_dict(d) for d in json.loads(path.read_text())]


@contextlib.contextmanager
def local_stack(model: str = "") -> Iterator[str]:
    from svc_common.stack import Stack, StackConfig, free_port_base

    log_dir = tempfile.mkdtemp(prefix="fastswitch-judge-")
    print(f"starting a local stack (logs in {log_dir}) ...", file=sys.stderr)
    config = StackConfig.build(port=free_port_base(), model=model, device_blocks=256, host_blocks=256)
    with Stack(config, log_dir=log_dir) as stack:
        yield stack.addr


def report(i: int, n: int, pair: JudgePair, r: JudgeResult) -> None:
    outcome = "malformed" if r.verdict is None else ("correct" if r.verdict == pair.better else "wrong")
    print(f"[{i}/{n}] {pair.name} ({pair.about})")
    print(f"  verdict: {r.label}   ground truth: {pair.better}   -> {outcome}")
    if r.malformed:
        print(f"  malformed: {r.malformed}")
    dims = ", ".join(r.dimensions.chosen) or "-"
    print(f"  dimensions: {dims}" + (f"   (problem: {r.dimensions.problem})" if r.dimensions.problem else ""))
    a, b = r.analysis, r.rethink
    print(
        f"  turn 1: {a.prompt_tokens} prompt tokens, {len(a.token_ids)} generated, ended by {a.finish_reason}, "
        f"{r.analysis_s:.1f} s"
    )
    print(
        f"  turn 2: {b.prompt_tokens} prompt tokens, {r.reused_prefix_tokens} reused from turn 1, "
        f"{len(b.token_ids)} generated, ended by {b.finish_reason}, TTFT {r.rethink_ttft_s:.2f} s, {r.rethink_s:.1f} s"
    )


def summarise(pairs: list[JudgePair], results: list[JudgeResult]) -> None:
    formed = [(p, r) for p, r in zip(pairs, results, strict=True) if r.verdict is not None]
    correct = sum(r.verdict == p.better for p, r in formed)
    malformed = len(results) - len(formed)
    accuracy = f"{correct}/{len(formed)} = {correct / len(formed):.0%}" if formed else "n/a (no well-formed verdict)"
    dim_problems = sum(r.dimensions.problem is not None for r in results)
    reused = [r.reused_prefix_tokens for r in results]
    print()
    print(f"pairs: {len(results)}")
    print(f"well-formed verdicts: {len(formed)}, accuracy over them: {accuracy}")
    print(f"malformed verdicts: {malformed}")
    print(f"turn-1 dimension problems: {dim_problems}")
    print(f"turn-2 reused prefix tokens: min {min(reused)}, mean {statistics.mean(reused):.0f}, max {max(reused)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default=None, help="a running stack; without it a local one is started")
    parser.add_argument("--model", default="", help="model of the local stack (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--pairs", type=pathlib.Path, default=PAIRS, help="JSON list of response pairs")
    parser.add_argument("--analysis-tokens", type=int, default=160, help="max tokens of turn 1")
    parser.add_argument("--verdict-tokens", type=int, default=64, help="max tokens of turn 2")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--show-text", action="store_true", help="print both turns' text")
    parser.add_argument(
        "--unconstrained", action="store_true", help="no structured output: the model may answer in any format"
    )
    args = parser.parse_args(argv)

    pairs = load_pairs(args.pairs)
    with contextlib.ExitStack() as stack:
        addr = args.addr or stack.enter_context(local_stack(args.model))
        client = stack.enter_context(Client(addr))
        results = []
        for i, pair in enumerate(pairs, 1):
            result = judge(
                client,
                pair,
                analysis_tokens=args.analysis_tokens,
                verdict_tokens=args.verdict_tokens,
                temperature=args.temperature,
                constrained=not args.unconstrained,
            )
            results.append(result)
            report(i, len(pairs), pair, result)
            if args.show_text:
                print("  --- turn 1 ---\n" + result.analysis.text.strip())
                print("  --- turn 2 ---\n" + result.rethink.text.strip())
            sys.stdout.flush()
    summarise(pairs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
