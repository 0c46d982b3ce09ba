"""Device strings: ``cpu``, ``cuda:N``, ``npu:N`` (Ascend, through torch_npu)."""

from __future__ import annotations

import re

import torch

from pdserve.errors import InvalidArgument

_DEVICE_RE = re.compile(r"^(cpu|cuda|npu)(?::(\d+))?$")


def resolve_device(spec: str) -> torch.device:
    """Validate ``spec`` and make sure its backend is usable here."""
    m = _DEVICE_RE.match(spec)
    if m is None:
        raise InvalidArgument(f"device must be 'cpu', 'cuda:N' or 'npu:N', got {spec!r}")
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {spec!r}: CUDA is not available in this torch build")
        if index >= torch.cuda.device_count():
            raise InvalidArgument(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return torch.device("cuda", index)
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device type with torch)
    except ImportError as e:
        raise InvalidArgument(
            f"device {spec!r} needs torch_npu (pip install 'pdserve[npu]'): {e}"
        ) from None
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available() or index >= npu.device_count():
        raise InvalidArgument(f"device {spec!r}: no such Ascend NPU is available")
    return torch.device("npu", index)
