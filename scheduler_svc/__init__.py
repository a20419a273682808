"""The scheduler service: queues, policies, preemption, block tables, tokenizer, streaming (CPU only)."""
