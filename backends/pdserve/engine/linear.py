"""A linear layer that picks its CPU GEMM by the number of rows.

Decode steps multiply a handful of rows by every weight; MKL's sgemm (what
``F.linear`` uses on CPU) is slow for such skinny products, while oneDNN with
the weight pre-packed into its blocked layout streams the weight at close to
memory bandwidth. Prefill (hundreds of rows) stays on MKL, which is faster
there. Measured on the 2-core EPYC dev box, small preset weights (387 MB):

    rows   MKL F.linear   oneDNN packed for 1 row   packed for 32 rows
    1      22.4 ms        14.9 ms                   16.8 ms
    8      55.0 ms        36.4 ms                   27.2 ms
    32     88.7 ms        65.5 ms                   60.2 ms

so one row and 2..SMALL_M rows get their own packed copy. Packing happens on
first use (a prefill-only instance never makes one); each copy costs the
weight's size again, which is why it is limited to fp32 on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_M = 64  # rows up to which a packed oneDNN weight is used


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 *, pack: bool = True) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias  # [out]
        self._can_pack = pack and _can_pack(weight)
        self._packed: dict[int, torch.Tensor] = {}  # batch-size hint -> oneDNN weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, out]."""
        rows = x.shape[0]
        if self._can_pack and 0 < rows <= SMALL_M:
            hint = 1 if rows == 1 else 32
            packed = self._packed.get(hint)
            if packed is None:
                # Racing threads may both pack; either result is the same.
                packed = self._packed[hint] = torch.ops.mkldnn._reorder_linear_weight(
                    self.weight, hint
                )
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
