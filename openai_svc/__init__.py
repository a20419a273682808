"""The OpenAI-compatible HTTP front: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`
and `/metrics`, as a thin ASGI adapter over the scheduler's gRPC API (one SDK channel, reused)."""
