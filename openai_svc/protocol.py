"""The OpenAI request bodies we accept, and the response bodies we send.

Requests are pydantic models: a wrong type or an out-of-range value is a 400 naming the field.
Unknown fields are ignored (clients send many we do not use); known features we do not implement
(n > 1, logprobs, tools, penalties, ...) are refused with a 400 that says so rather than ignored.

Our extensions, in the body (the `openai` client's `extra_body`):
- `priority` (vLLM's name and meaning: lower is served earlier; matters under `--policy priority`),
- `conversation_id`: continue a server-kept conversation with KV reuse; send only the new messages,
- `top_k` and `ignore_eos` (vLLM's names).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fastswitch.client import Completion

# Feature fields whose default is the only value we serve: anything else is refused, not ignored.
_UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "suffix": (None, ""),
    "echo": (None, False),
    "best_of": (None, 1),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class UnsupportedFeature(ValueError):
    """A known OpenAI feature with a value we do not serve."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's newer "developer" role is the system message of older models' templates.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class _GenerationBody(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # Our extensions.
    priority: int = 0
    conversation_id: str | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool = False

    def check_supported(self) -> None:
        """Refuse known features we do not serve (UnsupportedFeature names the field)."""
        if self.n != 1:
            raise UnsupportedFeature("n", f"n={self.n} is not supported: this server returns one choice (n=1)")
        extra = self.model_extra or {}
        for name, allowed in _UNSUPPORTED_UNLESS_DEFAULT.items():
            if name in extra and extra[name] not in allowed:
                raise UnsupportedFeature(name, f"{name}={extra[name]!r} is not supported by this server")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self, default_max_tokens: int) -> dict[str, Any]:
        """The SDK's generate() keywords for the sampling and length fields (OpenAI's defaults)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "max_tokens": self.requested_max_tokens() or default_max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": max(0, self.top_k or 0),
            "seed": self.seed,
            "stop": stop,
            "ignore_eos": self.ignore_eos,
            # vLLM's meaning (lower is served earlier) onto ours (larger runs first).
            "priority": -self.priority,
            "conversation_id": self.conversation_id or "",
        }

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_GenerationBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationBody):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for (legacy) completions

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# -- responses ------------------------------------------------------------------------------------------

FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "stop", "error": "error"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV was reused (a conversation's history)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_usage(c: Completion) -> dict[str, Any]:
    return usage(c.prompt_tokens, len(c.token_ids), c.reused_prefix_tokens)


def chat_completion(response_id: str, model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(c.finish_reason or "", "stop"),
            }
        ],
        "usage": completion_usage(c),
    }


def text_completion(response_id: str, model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": c.text,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(c.finish_reason or "", "stop"),
            }
        ],
        "usage": completion_usage(c),
    }


def chat_chunk(
    response_id: str, model: str, created: int, delta: dict[str, str], finish: str | None, with_usage: bool
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(finish, "stop") if finish else None,
            }
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def text_chunk(
    response_id: str, model: str, created: int, text: str, finish: str | None, with_usage: bool
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(finish, "stop") if finish else None,
            }
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(response_id: str, model: str, created: int, obj: str, usage_body: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": response_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_body}
