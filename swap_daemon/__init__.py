"""The swap daemon: moves KV block groups between the executor's device pool and a host pool.

Why a separate process: preemption is only cheap if the context switch is cheap. The daemon owns the
host (pinned) KV pool and runs every swap on its own copy streams / memcpy threads, so the executor's
step loop never waits on a copy it does not need, and the scheduler gets one `SwapDone` per command as
soon as its bytes have landed. It maps the executor's pool (CUDA IPC on a GPU, named shared memory on
a CPU-only machine) and holds no policy: the scheduler names the block runs, the daemon copies them.

Layout: `config.py` (one dataclass), `pools.py` (host pool + device pool mapping), `copier.py` (the
copy engines and command validation, no gRPC), `server.py` (thin gRPC adapter), `bench.py`.
"""
