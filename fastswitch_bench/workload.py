"""The benchmark's workload: multi-turn chat conversations, seeded, saved to a file, replayed by every mode.

What is drawn, and from what (numbers before any scaling):

* **Turns per conversation**: a geometric distribution truncated to ``[min_turns, max_turns]`` whose
  mean is 5.5, the average number of turns of the Multi-Round ShareGPT data set the FastSwitch paper
  replays (Shen, Li, Gao, arXiv 2411.18424). The paper gives the mean, not the shape; geometric is
  our choice (most conversations are short, a few are long). Turn counts are drawn by stratified
  sampling (one draw per 1/n quantile slice, then shuffled), so that even a 10-conversation preset
  has the distribution's mean rather than a lucky or unlucky sample of it.
* **Tokens per user turn and per answer**: lognormal with means of 161 input and 338 output tokens,
  the ShareGPT means reported by the vLLM paper (Kwon et al., arXiv 2309.06180, Fig. 11: 161.31
  and 337.99 tokens). The paper gives means and histograms, not parameters; the shapes
  (sigma 1.0 for input, 0.8 for output: a long right tail) are our choice.
* **Scaling**: a preset divides both means by ``scale`` and clips the draws to its bounds, so that a
  CPU run is feasible: ``small`` uses scale 32 (means of 5.0 and 10.6 tokens, bounds [2, 24] and
  [4, 32]).
  The lognormal's sigma is kept and its location is solved so that the mean *after clipping* is
  still the scaled ShareGPT mean. The realised means are in the workload's summary.
* **Arrivals**: conversations arrive as a Poisson process at ``rate_per_s`` (exponential gaps;
  the first one at t = 0). The next turn of a conversation is sent when the previous answer has
  completed plus a think time drawn from an exponential distribution with mean ``think_mean_s``
  (ShareGPT records no timing, so this is our choice).
* **Tenants and priorities**: conversation i belongs to tenant ``i % tenants`` and starts at a
  priority drawn uniformly from ``[0, priority_levels)``. Priorities then change at run time as
  in the paper: the scheduler applies the "random" or "markov" pattern with probability
  ``priority_update_prob`` per live request per iteration (the workload records the pattern; the
  benchmark passes it to the stack).
* **Text**: real English, not random token ids. Each user turn is cut from ``corpus.txt`` (questions
  and requests written for this project): it starts at the beginning of a line and runs on into the
  next lines until it has the drawn number of tokens (measured with the model's tokenizer).

The same spec and seed give the same file, byte for byte. Each aspect (turns, lengths, text, timing,
tenants) has its own random stream, so changing one setting does not reshuffle the others.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT = "fastswitch-workload/1"
CORPUS_PATH = pathlib.Path(__file__).with_name("corpus.txt")

SHAREGPT_MEAN_TURNS = 5.5  # Multi-Round ShareGPT, FastSwitch paper (arXiv 2411.18424)
SHAREGPT_MEAN_INPUT_TOKENS = 161.0  # ShareGPT, vLLM paper (arXiv 2309.06180), Fig. 11: 161.31
SHAREGPT_MEAN_OUTPUT_TOKENS = 338.0  # same source: 337.99

SOURCES = {
    "turns": "mean 5.5 turns per conversation: Multi-Round ShareGPT as used by FastSwitch (arXiv 2411.18424)",
    "lengths": "mean 161 input / 338 output tokens per turn: ShareGPT in the vLLM paper (arXiv 2309.06180, Fig. 11)",
    "shapes": "truncated geometric turn counts, lognormal lengths (sigma 1.0 input, 0.8 output): our choice",
    "timing": "Poisson conversation arrivals; exponential think time between turns: our choice",
    "text": "user turns cut from fastswitch_bench/corpus.txt (English questions written for this project)",
}

CountTokens = Callable[[str], int]


@dataclass(slots=True)
class WorkloadSpec:
    """Everything that determines a workload; a preset is one of these plus the stack's settings."""

    conversations: int
    rate_per_s: float  # Poisson arrivals of conversations
    seed: int = 0
    mean_turns: float = SHAREGPT_MEAN_TURNS
    min_turns: int = 1
    max_turns: int = 12
    input_mean_tokens: float = SHAREGPT_MEAN_INPUT_TOKENS  # before scaling
    output_mean_tokens: float = SHAREGPT_MEAN_OUTPUT_TOKENS
    input_sigma: float = 1.0
    output_sigma: float = 0.8
    scale: float = 1.0  # both means are divided by this
    min_input_tokens: int = 4  # bounds after scaling
    max_input_tokens: int = 1024
    min_output_tokens: int = 4
    max_output_tokens: int = 1024
    think_mean_s: float = 1.0
    tenants: int = 4
    priority_levels: int = 4
    priority_updates: str = "none"  # none | random | markov (applied by the scheduler)
    priority_update_prob: float = 0.0  # per live request, per iteration
    # A conversation ends before the turn whose whole history (every prompt and answer so far, this
    # prompt and its answer, with CONTEXT_MARGIN_PER_TURN each for the chat template) would pass this
    # many tokens: the model's context, beyond which the server refuses a turn (0: no bound).
    max_context_tokens: int = 0

    def validate(self) -> None:
        if self.conversations < 1:
            raise ValueError(f"conversations must be >= 1, got {self.conversations}")
        if self.rate_per_s <= 0:
            raise ValueError(f"rate must be > 0 conversations/s, got {self.rate_per_s}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if not self.min_turns <= self.mean_turns <= (self.min_turns + self.max_turns) / 2:
            raise ValueError(
                f"a truncated geometric on [{self.min_turns}, {self.max_turns}] has a mean between "
                f"{self.min_turns} and {(self.min_turns + self.max_turns) / 2}, asked for {self.mean_turns}"
            )
        if not 1 <= self.min_input_tokens <= self.max_input_tokens:
            raise ValueError("need 1 <= min_input_tokens <= max_input_tokens")
        if not 1 <= self.min_output_tokens <= self.max_output_tokens:
            raise ValueError("need 1 <= min_output_tokens <= max_output_tokens")
        if self.max_context_tokens < 0:
            raise ValueError(f"max_context_tokens must be >= 0 (0: no bound), got {self.max_context_tokens}")
        if self.scale <= 0 or self.think_mean_s < 0 or self.tenants < 1 or self.priority_levels < 1:
            raise ValueError("scale must be > 0, think time >= 0, tenants and priority levels >= 1")
        for what, mean, low, high in (
            ("input", self.input_mean_tokens, self.min_input_tokens, self.max_input_tokens),
            ("output", self.output_mean_tokens, self.min_output_tokens, self.max_output_tokens),
        ):
            if not low < mean / self.scale < high:
                raise ValueError(
                    f"the scaled {what} mean ({mean:.0f} / {self.scale:g} = {mean / self.scale:.1f} tokens) must lie "
                    f"strictly inside its bounds [{low}, {high}]: change the scale or the bounds"
                )
        if self.priority_updates not in ("none", "random", "markov"):
            raise ValueError(f"priority updates must be none, random or markov, got {self.priority_updates!r}")
        if not 0.0 <= self.priority_update_prob <= 1.0:
            raise ValueError(f"priority update probability must be in [0, 1], got {self.priority_update_prob}")


@dataclass(slots=True)
class Turn:
    prompt: str  # the user's message (the server applies the chat template over the conversation)
    prompt_tokens: int  # tokens of `prompt` alone, by the tokenizer the workload was cut with
    max_tokens: int  # the answer's length: sent with ignore_eos, so every mode generates exactly this
    think_s: float  # pause after the previous answer completes before this turn is sent (0 for turn 1)


@dataclass(slots=True)
class Conversation:
    conversation_id: str
    tenant: str
    priority: int  # initial priority of every turn (the scheduler may change it while a turn runs)
    arrival_s: float  # when turn 1 is sent, from the start of the replay
    turns: list[Turn] = field(default_factory=list)


@dataclass(slots=True)
class Workload:
    spec: WorkloadSpec
    tokenizer: str  # what measured the prompt lengths
    conversations: list[Conversation]

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def summary(self) -> dict[str, Any]:
        """The realised statistics (after scaling and clipping): what the run actually replayed."""
        turns = [t for c in self.conversations for t in c.turns]
        counts = [len(c.turns) for c in self.conversations]
        return {
            "conversations": len(self.conversations),
            "requests": len(turns),
            "mean_turns": sum(counts) / len(counts),
            "max_turns": max(counts),
            "mean_prompt_tokens": sum(t.prompt_tokens for t in turns) / len(turns),
            "max_prompt_tokens": max(t.prompt_tokens for t in turns),
            "mean_output_tokens": sum(t.max_tokens for t in turns) / len(turns),
            "max_output_tokens": max(t.max_tokens for t in turns),
            "total_output_tokens": sum(t.max_tokens for t in turns),
            "last_arrival_s": max(c.arrival_s for c in self.conversations),
            "tenants": sorted({c.tenant for c in self.conversations}),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "spec": asdict(self.spec),
            "tokenizer": self.tokenizer,
            "sources": SOURCES,
            "summary": self.summary(),
            "conversations": [asdict(c) for c in self.conversations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format: {data.get('format')!r})")
        known = {f.name for f in fields(WorkloadSpec)}
        spec = WorkloadSpec(**{k: v for k, v in data["spec"].items() if k in known})
        conversations = [
            Conversation(
                conversation_id=c["conversation_id"],
                tenant=c["tenant"],
                priority=c["priority"],
                arrival_s=c["arrival_s"],
                turns=[Turn(**t) for t in c["turns"]],
            )
            for c in data["conversations"]
        ]
        return cls(spec=spec, tokenizer=data.get("tokenizer", ""), conversations=conversations)

    def save(self, path: str | os.PathLike[str]) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Workload:
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


# -- distributions ------------------------------------------------------------------------------------


def geometric_pmf(low: int, high: int, mean: float) -> list[float]:
    """P(k) for k in [low, high], proportional to q**(k - low), with q chosen so the mean is `mean`."""
    ks = range(low, high + 1)

    def pmf(q: float) -> list[float]:
        weights = [q ** (k - low) for k in ks]
        total = sum(weights)
        return [w / total for w in weights]

    def mean_of(q: float) -> float:
        return sum(k * p for k, p in zip(ks, pmf(q), strict=True))

    lo, hi = 0.0, 1.0  # the mean rises with q: low at q=0, the midpoint (uniform) at q=1
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_of(mid) < mean else (lo, mid)
    return pmf((lo + hi) / 2)


def stratified_turns(rng: random.Random, n: int, low: int, high: int, mean: float) -> list[int]:
    """n turn counts: one inverse-CDF draw in each 1/n slice of [0, 1), shuffled."""
    probs = geometric_pmf(low, high, mean)
    cdf = list(itertools.accumulate(probs))
    out = []
    for i in range(n):
        u = (i + rng.random()) / n
        k = next((j for j, c in enumerate(cdf) if u < c), len(cdf) - 1)
        out.append(low + k)
    rng.shuffle(out)
    return out


def clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[min(max(X, low), high)] for X ~ lognormal(mu, sigma)."""

    def cdf(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    a, b = math.log(low), math.log(high)
    below, above = cdf((a - mu) / sigma), 1 - cdf((b - mu) / sigma)
    s2 = sigma * sigma
    inside = math.exp(mu + s2 / 2) * (cdf((b - mu - s2) / sigma) - cdf((a - mu - s2) / sigma))
    return low * below + inside + high * above


def lognormal_mu(mean: float, sigma: float, low: float, high: float) -> float:
    """The location mu for which a lognormal(mu, sigma) clipped to [low, high] has mean `mean`."""
    if not low < mean < high:
        raise ValueError(f"a mean of {mean:.1f} tokens is not inside the bounds [{low}, {high}]")
    lo, hi = math.log(low) - 10 * sigma, math.log(high) + 10 * sigma  # the clipped mean rises with mu
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_lognormal_mean(mid, sigma, low, high) < mean else (lo, mid)
    return (lo + hi) / 2


def lognormal_tokens(rng: random.Random, mu: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(mu, sigma))))


# -- text ---------------------------------------------------------------------------------------------


def load_corpus(path: str | os.PathLike[str] = CORPUS_PATH) -> list[str]:
    lines = [line.strip() for line in pathlib.Path(path).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def word_count(text: str) -> int:
    """A tokenizer stand-in (one token per word), for tests and tokenizer-free use."""
    return len(text.split())


def hf_token_counter(tokenizer: Any) -> CountTokens:
    """Token counts of a Hugging Face tokenizer (no special tokens: the chat template adds those)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_text(lines: list[str], start: int, n_tokens: int, count: CountTokens) -> tuple[str, int]:
    """Text from line `start` on (wrapping around) with as many words as fit in n_tokens; (text, tokens)."""
    words: list[str] = []
    i = start
    while len(words) < n_tokens:  # every word is at least one token: n_tokens words are enough
        words.extend(lines[i % len(lines)].split())
        i += 1
    words = words[:n_tokens]
    lo, hi = 1, len(words)  # the largest prefix of words with count <= n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    return text, count(text)


# -- the generator ------------------------------------------------------------------------------------

# Tokens a turn's chat template adds around its prompt and answer, at most (role markers, newlines,
# a system prompt on the first), counted against `max_context_tokens`.
CONTEXT_MARGIN_PER_TURN = 32


def generate(
    spec: WorkloadSpec,
    count_tokens: CountTokens = word_count,
    tokenizer_name: str = "words",
    corpus: list[str] | None = None,
) -> Workload:
    """Draw a workload from `spec` (seeded: the same spec and tokenizer give the same workload)."""
    spec.validate()
    lines = corpus if corpus is not None else load_corpus()

    def stream(name: str) -> random.Random:
        return random.Random(f"{spec.seed}/{name}")  # str seeds hash deterministically (sha512)

    turns_rng, len_rng, text_rng, time_rng, who_rng = (
        stream(n) for n in ("turns", "lengths", "text", "timing", "tenants")
    )
    mu_in = lognormal_mu(
        spec.input_mean_tokens / spec.scale, spec.input_sigma, spec.min_input_tokens, spec.max_input_tokens
    )
    mu_out = lognormal_mu(
        spec.output_mean_tokens / spec.scale, spec.output_sigma, spec.min_output_tokens, spec.max_output_tokens
    )
    counts = stratified_turns(turns_rng, spec.conversations, spec.min_turns, spec.max_turns, spec.mean_turns)
    conversations = []
    arrival = 0.0
    for i, n_turns in enumerate(counts):
        if i > 0:
            arrival += time_rng.expovariate(spec.rate_per_s)
        conv = Conversation(
            conversation_id=f"c{i:04d}",
            tenant=f"tenant-{i % spec.tenants}",
            priority=who_rng.randrange(spec.priority_levels),
            arrival_s=round(arrival, 4),
        )
        history = 0
        for k in range(n_turns):
            n_in = lognormal_tokens(len_rng, mu_in, spec.input_sigma, spec.min_input_tokens, spec.max_input_tokens)
            n_out = lognormal_tokens(len_rng, mu_out, spec.output_sigma, spec.min_output_tokens, spec.max_output_tokens)
            text, n_text = cut_text(lines, text_rng.randrange(len(lines)), n_in, count_tokens)
            think = time_rng.expovariate(1 / spec.think_mean_s) if k > 0 and spec.think_mean_s > 0 else 0.0
            # (Every turn is drawn, kept or not: the later conversations draw what they drew without a bound.)
            history += CONTEXT_MARGIN_PER_TURN + n_text + n_out
            if k > 0 and spec.max_context_tokens and history > spec.max_context_tokens:
                continue  # (the history only grows: every later turn goes too; the first always stays)
            conv.turns.append(Turn(prompt=text, prompt_tokens=n_text, max_tokens=n_out, think_s=round(think, 4)))
        conversations.append(conv)
    return Workload(spec=spec, tokenizer=tokenizer_name, conversations=conversations)
