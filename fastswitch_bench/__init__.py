"""Benchmarks: a seeded multi-turn workload (`workload.py`) replayed by every stack mode and by the
`transformers` continuous-batching peer (`peer.py`) on the same model and machine (`runner.py`)."""
