"""A stand-in for Triton's ``triton_python_backend_utils``, for in-process role tests.

The real module exists only inside a Triton Python stub. A role built outside
one needs: metric families (counter, gauge, histogram) whose metrics take
increments, sets and observations; response tensors and responses; error codes.
This module provides those and nothing else: metrics keep their last value and
responses are plain records (tests pass their own responder to a role).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any


class _Metric:
    def __init__(self) -> None:
        self.value = 0.0

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.value = value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> _Metric:
        return _Metric()


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, \
        CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> Any:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None,
                 error: TritonError | None = None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


class PayloadOut:
    """A Responder stand-in (``roles.triton.Responder``'s ``send``) that keeps the
    payloads a role answers with."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.is_final = False

    def send(self, outputs: dict[str, Any], final: bool = False) -> None:
        self.payloads.append(outputs["payload"][0])
        self.is_final = final


def module() -> types.ModuleType:
    """A fresh module object to put in ``sys.modules`` under Triton's name."""
    mod = types.ModuleType("triton_python_backend_utils")
    for name, value in (("MetricFamily", MetricFamily), ("TritonError", TritonError),
                        ("Tensor", Tensor), ("InferenceResponse", InferenceResponse),
                        ("TRITONSERVER_RESPONSE_COMPLETE_FINAL", 1)):
        setattr(mod, name, value)
    return mod


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """This fake as ``triton_python_backend_utils`` while the block runs; the
    ``pdserve.roles`` modules imported against it are dropped afterwards, so no
    other test sees them or the fake."""
    before = set(sys.modules)
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = module()
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("pdserve.roles") or name == "triton_python_backend_utils":
                del sys.modules[name]
        if saved is not None:
            sys.modules["triton_python_backend_utils"] = saved
        else:
            sys.modules.pop("triton_python_backend_utils", None)
