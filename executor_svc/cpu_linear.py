"""The model's linear layers on a CPU through oneDNN, with each weight packed once at load time.

A serving step multiplies a handful of rows (one per decoding request) by every weight matrix. For
such skinny products, the plain `F.linear` path (MKL's sgemm on a transposed row-major weight)
reaches a fraction of the memory bandwidth that streaming the weights allows: on the 2-core
development machine a decode step of SmolLM2-135M at batch 3 spends about 100 ms in its linear
layers, against about 25 ms once the weights sit in oneDNN's own blocked layout (the packing
PyTorch's inductor does for CPU inference; `torch.ops.mkldnn._linear_pointwise`). The gain holds
from 1 row to prefill chunks of hundreds. Measured by `python -m executor_svc.bench_step
--compare-cpu-linear` (docs/cpu-step.md).

`pack_linears` swaps every `nn.Linear` of the model for a `PackedLinear` in place, the model's own
forward is unchanged. A packed weight replaces the dense one, which is freed (its parameter stays on
the meta device so shapes, dtypes and parameter counts still read right, and `state_dict()` unpacks
it); a weight shared with another module (an LM head tied to the input embeddings) stays.
Results agree with `F.linear` to float rounding (a different summation order), as any change of
batch shape already does; greedy outputs stay token-identical to `generate()` (tests/test_e2e.py).
"""

from __future__ import annotations

import structlog
import torch
from torch import nn

log = structlog.get_logger(__name__)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`y = x W^T + b` over a weight held in oneDNN's packed layout (CPU only)."""

    def __init__(self, linear: nn.Linear, keep_dense: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        dense = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(dense, None)
        # The dense weight stays where another module reads it (a tied embedding); otherwise only its
        # shape and dtype are kept, on the meta device, so the model still describes itself.
        self.weight = linear.weight if keep_dense else nn.Parameter(dense.to("meta"), requires_grad=False)
        self.bias = linear.bias

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta:  # the packed layout converts back exactly
            destination[prefix + "weight"] = self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of a CPU model by a `PackedLinear`; returns how many were packed.

    Packs nothing (and says why) where oneDNN cannot take the model's dtype or is not built in."""
    if not onednn_available():
        log.warning("cpu_linear_dense", reason="this torch has no oneDNN linear; --cpu-linear onednn falls back")
        return 0
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        return 0
    shared = _shared_weights(model, {id(m.weight) for _, m in linears})
    try:
        probe = linears[0][1]
        probe_out = torch.ops.mkldnn._linear_pointwise(
            torch.zeros(1, probe.in_features, dtype=probe.weight.dtype),
            torch.ops.mkldnn._reorder_linear_weight(probe.weight.detach(), None),
            None,
            "none",
            [],
            "",
        )
        del probe_out
    except RuntimeError as err:
        log.warning("cpu_linear_dense", reason=f"oneDNN cannot run this model's linear layers: {err}")
        return 0
    for name, linear in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear, keep_dense=id(linear.weight) in shared))
    return len(linears)


def _shared_weights(model: nn.Module, weight_ids: set[int]) -> set[int]:
    """Ids of the linear weights some other module also holds (e.g. a tied input embedding)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in weight_ids:
                holders[id(p)] = holders.get(id(p), 0) + 1
    return {pid for pid, n in holders.items() if n > 1}
