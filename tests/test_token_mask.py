"""The executor's half of structured output: a packed grammar bitmask applied to logits before
sampling, and its trip through the step plan. No model, no grammar engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from executor_svc.sampler import sample
from executor_svc.token_mask import apply_token_bitmask, token_allowed
from svc_common.plan import Sampling, ScheduledChunk, StepPlan

VOCAB = 1000


def pack(allowed: list[int], vocab: int = VOCAB) -> bytes:
    """The wire format: bit t % 8 of byte t // 8 set = token t allowed (padded to 32-bit words)."""
    bits = np.zeros(-(-vocab // 32) * 32, dtype=np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def test_a_bitmask_keeps_allowed_logits_and_sets_every_other_to_minus_inf() -> None:
    logits = torch.randn(VOCAB)
    before = logits.clone()
    allowed = [0, 7, 8, 31, 32, 999]
    apply_token_bitmask(logits, pack(allowed))
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[allowed] = True
    assert torch.equal(logits[keep], before[keep])
    assert torch.isneginf(logits[~keep]).all()
    assert all(token_allowed(pack(allowed), t) == (t in allowed) for t in range(VOCAB))


def test_greedy_picks_the_best_allowed_token_and_leaves_unconstrained_rows_alone() -> None:
    logits = torch.randn(3, VOCAB)
    best = logits.argmax(-1).tolist()
    allowed = [t for t in (5, 17, 400) if t != best[0]]
    masks = [pack(allowed), b"", pack([best[2], 3])]
    out = sample(logits.clone(), [Sampling()] * 3, [10, 10, 10], masks)
    assert out[0] == max(allowed, key=lambda t: logits[0, t].item())
    assert out[1] == best[1]
    assert out[2] == best[2]  # the best token is allowed: the mask changes nothing


def test_sampling_with_temperature_top_k_and_top_p_never_leaves_the_mask() -> None:
    logits = torch.randn(1, VOCAB) * 3
    allowed = [2, 50, 51, 52, 600]
    params = [Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=7)]
    drawn = {sample(logits.clone(), params, [pos], [pack(allowed)])[0] for pos in range(200)}
    assert drawn <= set(allowed) and len(drawn) > 1


def test_a_bitmask_too_short_for_the_vocabulary_is_rejected() -> None:
    with pytest.raises(ValueError, match="needs 125"):
        sample(torch.randn(1, VOCAB), [Sampling()], [1], [pack([1], vocab=64)])


def test_the_bitmask_survives_the_step_plans_proto() -> None:
    mask = pack([1, 2, 3])
    plan = StepPlan(4, chunks=[ScheduledChunk("a", [9], 5, [], True, mask), ScheduledChunk("b", [9], 5, [], True)])
    back = StepPlan.from_proto(plan.to_proto())
    assert back.chunks[0].token_bitmask == mask and back.chunks[1].token_bitmask == b""
