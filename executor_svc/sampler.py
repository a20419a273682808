"""Token sampling: greedy, temperature, top-k, top-p, seeded; grammar masks applied first.

A seeded request draws from a generator seeded by (seed, position), so its output does not depend on
batching or on being preempted and recomputed. The generator lives on the logits' device (a CUDA
multinomial refuses a CPU generator), so a seed reproduces its output on the same kind of device.
"""

from __future__ import annotations

import torch

from executor_svc.token_mask import apply_token_bitmask, check_bitmask, token_allowed
from svc_common.plan import Sampling

_MASK = 0x7FFF_FFFF_FFFF_FFFF


def sample(
    logits: torch.Tensor, params: list[Sampling], positions: list[int], bitmasks: list[bytes] | None = None
) -> list[int]:
    """One token per row of `logits` [N, V]; `positions` is the index the sampled token will take.

    `bitmasks` (structured output): per row, the packed tokens its grammar allows (empty: all). A
    greedy row whose best token is allowed needs no mask (the common case in free-text stretches);
    the others are masked before they are picked from.
    """
    out = torch.argmax(logits, dim=-1).tolist()
    for row, mask in enumerate(bitmasks or ()):
        if not mask:
            continue
        check_bitmask(mask, logits.shape[-1])
        if params[row].greedy and token_allowed(mask, out[row]):
            continue
        apply_token_bitmask(logits[row], mask)
        if params[row].greedy:
            out[row] = int(torch.argmax(logits[row]).item())
    for row, (p, pos) in enumerate(zip(params, positions, strict=True)):
        if p.greedy:
            continue
        scores = logits[row].float() / p.temperature
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if 0.0 < p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed((p.seed * 1_000_003 + pos) & _MASK)
        out[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return out
