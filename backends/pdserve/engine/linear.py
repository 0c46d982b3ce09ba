"""A linear layer that picks its CPU GEMM by the number of rows.

Decode steps multiply a handful of rows by every weight; MKL's sgemm (what
``F.linear`` uses on CPU) is slow for such skinny products, while oneDNN with
the weight pre-packed into its blocked layout streams the weight at close to
memory bandwidth. Prefill (hundreds of rows) stays on MKL, which is faster
there. The packed copy doubles the weight memory of fp32 CPU models, so it is
made only where it is used: fp32 on CPU, and only when the op exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows up to which the packed oneDNN path is used (decode batches).
SMALL_M = 64


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 *, pack: bool = True) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias  # [out]
        self._packed: torch.Tensor | None = None
        if pack and _can_pack(weight):
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, SMALL_M)
            except RuntimeError:  # a build without the oneDNN linear ops
                self._packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, out]."""
        if self._packed is not None and x.shape[0] <= SMALL_M:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
