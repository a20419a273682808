"""Structured output, the executor's half: mask the logits of constrained rows before sampling.

The scheduler sends, per sampled chunk, the tokens the request's grammar allows next as packed bits
(bit t % 8 of byte t // 8 is token t; `ScheduledChunk.token_bitmask`). A disallowed token's logit
becomes -inf, so greedy, temperature, top-k and top-p all pick among allowed tokens only. No grammar
engine on this side: the bits are unpacked on the host (numpy, one pass over 6 KiB a row) and each
constrained row is filled in place, on whatever device the logits live.
"""

from __future__ import annotations

import numpy as np
import torch


def check_bitmask(mask: bytes, vocab: int) -> None:
    if len(mask) * 8 < vocab:
        raise ValueError(f"a token bitmask has {len(mask)} bytes; a vocabulary of {vocab} needs {-(-vocab // 8)}")


def token_allowed(mask: bytes, token: int) -> bool:
    return bool(mask[token >> 3] >> (token & 7) & 1)


def apply_token_bitmask(row: torch.Tensor, mask: bytes) -> None:
    """In place: every token of `row` [V] that `mask` does not allow gets logit -inf."""
    vocab = row.shape[-1]
    check_bitmask(mask, vocab)
    packed = np.frombuffer(mask, dtype=np.uint8, count=-(-vocab // 8))
    # Unpack the inverted bits: a set bit is a token to drop, with no pass to negate a bool mask.
    drop = np.unpackbits(np.invert(packed), count=vocab, bitorder="little").view(np.bool_)
    with torch.inference_mode():  # the logits are inference tensors
        row.masked_fill_(torch.from_numpy(drop).to(row.device, non_blocking=True), float("-inf"))
