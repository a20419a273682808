"""Structured output: grammar-constrained decoding, the scheduler's half.

A request may carry one `OutputConstraint` (a JSON schema, any JSON object, a regular expression, a
choice among strings, or an EBNF grammar). `Grammars` compiles it with xgrammar (the engine behind
vLLM's, SGLang's and TensorRT-LLM's structured output; docs/structured-output.md says why), cached,
off the event loop; a constraint that does not compile is INVALID_ARGUMENT with xgrammar's message,
before the request exists. Each constrained request then owns a `GrammarState`: an xgrammar matcher
fed every token the request *generates* (never its prompt, never a recomputed token: recomputation
re-runs KV, not sampling), and the packed bitmask of the tokens allowed next. The bitmask rides in
the step plan (`ScheduledChunk.token_bitmask`); the executor masks the logits with it before sampling.

The next mask is filled right after a token is accepted, on the step loop: about 3-10 us a row
(docs/structured-output.md has the measurement), far below a step. When the grammar allows nothing
but end-of-sequence, the request ends there, without a step to sample the forced EOS.
"""

from __future__ import annotations

import enum
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from fastswitch.v1 import api_pb2
from svc_common.errors import InvalidArgument

log = structlog.get_logger(__name__)

# Compiled grammars kept for reuse (xgrammar's own cache, keyed by the grammar text and options).
COMPILE_CACHE_BYTES = 256 << 20
# A mask usually fills in 10-70 us; past this, the step loop visibly waits for it.
SLOW_FILL_S = 0.002
SLOW_FILL_HINT = (
    "filling this request's grammar mask is slow, and the step loop waits for it: counted repetitions of a "
    "group (`([a-z]+ ){20,}`) and repeated groups that split text several ways (`([a-z]+ +)*`) are "
    "xgrammar's slow case; character classes (`[a-z ]*`) are fast"
)


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


@dataclass(slots=True, frozen=True)
class OutputConstraint:
    """What the completion's text must match; `spec` is the schema, regex or EBNF text."""

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: api_pb2.GenerateRequest) -> OutputConstraint | None:
        which = msg.WhichOneof("structured_output")
        if which is None or (which == "json_object" and not msg.json_object):
            return None
        if which == "choice":
            return cls(ConstraintKind.CHOICE, choices=tuple(msg.choice.options))
        if which == "json_object":
            return cls(ConstraintKind.JSON_OBJECT)
        return cls(ConstraintKind(which), spec=getattr(msg, which))


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """`root ::= "a" | "b"`: JSON string escapes are also xgrammar EBNF's."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (?:Check failed: \(.*?\) is false: )?")


def engine_message(err: Exception) -> str:
    """xgrammar's message without its C++ log prefix (`[18:13:34] /project/cpp/x.cc:83: `)."""
    return _LOG_PREFIX.sub("", str(err).strip()) or type(err).__name__


class Grammars:
    """Compiles constraints against the model's vocabulary and starts per-request grammar states.

    Thread-safe: compiles run in worker threads (`asyncio.to_thread`) so a large schema never
    stalls the step loop; xgrammar's cache makes the second compile of a constraint free.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        if not stop_token_ids:
            raise ValueError("structured output needs the tokenizer's end-of-sequence token id")
        stops = sorted(stop_token_ids)
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        # Control tokens (<|im_start|>, <repo_name>, ...) decode to literal text for xgrammar, but the
        # detokenizer drops them: blank them, so no grammar ever allows them.
        vocab = [""] * vocab_size
        for token, idx in tokenizer.get_vocab().items():
            if idx < vocab_size:
                vocab[idx] = token
        for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if added.special and idx < vocab_size and idx not in stop_token_ids:
                vocab[idx] = ""
        self.info = xgr.TokenizerInfo(
            vocab,
            detected.vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=stops,
            add_prefix_space=detected.add_prefix_space,
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(
            self.info, max_threads=min(8, os.cpu_count() or 1), cache_limit_bytes=COMPILE_CACHE_BYTES
        )
        # Mask words with every token but the stop tokens: a mask with none of these bits allows only EOS.
        bits = np.ones(-(-vocab_size // 32) * 32, dtype=np.uint8)
        bits[vocab_size:] = 0
        bits[stops] = 0
        self._not_stop = np.packbits(bits, bitorder="little").view("<u4")
        self.fills = 0  # masks filled, and the CPU seconds it took (`stats`: grammar_fills, grammar_fill_s)
        self.fill_s = 0.0

    def compile(self, constraint: OutputConstraint) -> Any:
        """The compiled grammar (cached); InvalidArgument with xgrammar's message if it does not compile."""
        c, kind = self._compiler, constraint.kind
        try:
            if kind is ConstraintKind.JSON_SCHEMA:
                return c.compile_json_schema(constraint.spec, any_whitespace=False)
            if kind is ConstraintKind.JSON_OBJECT:
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind is ConstraintKind.REGEX:
                return c.compile_regex(constraint.spec)
            if kind is ConstraintKind.GRAMMAR:
                return c.compile_grammar(constraint.spec)
            if not constraint.choices or not all(constraint.choices):
                raise InvalidArgument("choice needs at least one option, and every option must be non-empty")
            return c.compile_grammar(choice_ebnf(constraint.choices))
        except InvalidArgument:
            raise
        except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types
            raise InvalidArgument(f"{kind.value} does not compile: {engine_message(err)}") from err

    def start(self, constraint: OutputConstraint) -> GrammarState:
        """A fresh grammar state for one request: compiled (a cache hit after `compile`), first mask filled."""
        state = GrammarState(self, self._xgr.GrammarMatcher(self.compile(constraint)))
        state.fill()
        return state


class GrammarState:
    """One request's position in its grammar, and the bitmask of the tokens it allows next.

    It follows the request's generated tokens only: preemption, swaps, recomputation and executor
    restarts move KV, never this.
    """

    __slots__ = ("grammars", "matcher", "mask", "done", "error", "warned", "_words")

    def __init__(self, grammars: Grammars, matcher: Any) -> None:
        self.grammars = grammars
        self.matcher = matcher
        self.mask = b""  # packed bits, little-endian words: bit t % 8 of byte t // 8 is token t
        self.done = False  # the grammar allows nothing but end-of-sequence (or has accepted it)
        self.error: str | None = None
        self.warned = False
        self._words = grammars._xgr.allocate_token_bitmask(1, grammars.vocab_size)

    def fill(self) -> None:
        if self.matcher.is_terminated():  # it accepted end-of-sequence: nothing comes next
            self.mask, self.done = b"", True
            return
        start = time.thread_time()  # CPU time: on a busy machine, wall time also counts others' turns
        self.matcher.fill_next_token_bitmask(self._words, 0)
        words = self._words.numpy()[0].view("<u4")
        self.mask = words.tobytes()
        self.done = self.matcher.is_terminated() or not np.any(words & self.grammars._not_stop)
        spent = time.thread_time() - start
        self.grammars.fills += 1
        self.grammars.fill_s += spent
        if spent > SLOW_FILL_S and not self.warned:
            self.warned = True  # once per request: it runs on the step loop, so every request waits
            log.warning("grammar_slow_mask", fill_ms=round(1e3 * spent, 2), hint=SLOW_FILL_HINT)

    def accept(self, token: int) -> bool:
        """Advance by one generated token and fill the next mask; False if the grammar rejects it
        (only an executor that ignored the mask can make that happen)."""
        if not self.matcher.accept_token(token):
            self.error = (
                f"token {token} is outside the request's grammar: the executor did not apply the grammar "
                "mask (is it older than the scheduler?)"
            )
            return False
        self.fill()
        return True
