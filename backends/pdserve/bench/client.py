"""Asyncio gRPC streaming client for a decoupled Triton LLM model.

One bidirectional ``ModelStreamInfer`` stream per request: it carries exactly
one request, so cancelling the stream cancels exactly that request, and no
request waits behind another on a shared stream.

Requests are built as protos directly rather than through
``tritonclient.grpc.aio.InferenceServerClient.stream_infer``: that method
rejects the ``triton_`` parameter prefix, and without
``triton_enable_empty_final_response`` the client cannot tell when a decoupled
request is finished. The aio client is still used for readiness checks.

Input and output names follow DESIGN.md §4 (vllm_backend conventions).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient

from pdserve.bench.records import RequestRecord, RequestSpec, RequestStatus
from pdserve.bench.workload import PromptIds
from pdserve.errors import Unavailable

# Client-side error kinds (server-side kinds are gRPC / Triton status names).
DEADLINE = "DEADLINE"  # cancelled by --max-duration-s
TIMEOUT = "TIMEOUT"  # cancelled by --request-timeout-s
INCOMPLETE = "INCOMPLETE"  # stream ended without a final response
SERVER_ERROR = "SERVER_ERROR"  # an error response whose kind cannot be told

# Errors in a stream response carry only a message (no status code), so the
# kind is read from the text: an explicit "[CODE]" / "StatusCode.CODE" first,
# then phrases Triton and pdserve use. Order matters: first match wins.
_CODE_IN_TEXT = re.compile(r"(?:\[|StatusCode\.)([A-Z_]{4,})\]?")
_KNOWN_CODES = {
    "INVALID_ARG", "INVALID_ARGUMENT", "UNAVAILABLE", "CANCELLED", "INTERNAL",
    "NOT_FOUND", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED",
}  # fmt: skip
_PHRASES: tuple[tuple[str, str], ...] = (
    ("cancel", "CANCELLED"),
    ("not healthy", "UNAVAILABLE"),
    ("unavailable", "UNAVAILABLE"),
    ("overload", "UNAVAILABLE"),
    ("no space", "UNAVAILABLE"),
    ("not ready", "UNAVAILABLE"),
    ("unknown model", "NOT_FOUND"),
    ("not found", "NOT_FOUND"),
    ("invalid", "INVALID_ARG"),
    ("unexpected", "INVALID_ARG"),
    ("out of range", "INVALID_ARG"),
    ("must be", "INVALID_ARG"),
)


def classify_error_message(message: str) -> str:
    """The error kind of an in-stream error message (see ``_PHRASES``)."""
    for code in _CODE_IN_TEXT.findall(message):
        if code in _KNOWN_CODES:
            return "INVALID_ARG" if code == "INVALID_ARGUMENT" else code
    lowered = message.lower()
    for phrase, kind in _PHRASES:
        if phrase in lowered:
            return kind
    return SERVER_ERROR


@dataclass(frozen=True)
class ClientConfig:
    """What every request of a run sends besides its lengths."""

    url: str = "127.0.0.1:8001"
    model: str = "pdserve"
    prompt_ids: PromptIds = field(default_factory=PromptIds)
    temperature: float = 0.0
    ignore_eos: bool = True
    scenario: str | None = None
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.url or "://" in self.url:
            raise ValueError(f"url must be host:port (no scheme), got {self.url!r}")
        if not self.model:
            raise ValueError("model name must not be empty")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


def build_request(config: ClientConfig, spec: RequestSpec) -> service_pb2.ModelInferRequest:
    """The gRPC request for ``spec``: exact prompt ids, ``max_tokens`` = output_len, streaming."""
    request = service_pb2.ModelInferRequest(model_name=config.model, id=f"bench-{spec.index}")
    sampling: dict[str, Any] = {
        "temperature": config.temperature,
        "ignore_eos": config.ignore_eos,
        "seed": config.prompt_ids.seed * 1_000_003 + spec.index,
    }
    ids = config.prompt_ids.for_request(spec)
    _add_input(request, "text_input", "BYTES", [1], _bytes_tensor(b""))
    _add_input(request, "input_ids", "INT32", [len(ids)], np.asarray(ids, "<i4").tobytes())
    _add_input(request, "max_tokens", "INT32", [1], np.asarray([spec.output_len], "<i4").tobytes())
    _add_input(request, "stream", "BOOL", [1], np.asarray([True], np.bool_).tobytes())
    _add_input(
        request, "exclude_input_in_output", "BOOL", [1], np.asarray([True], np.bool_).tobytes()
    )
    _add_input(
        request, "sampling_parameters", "BYTES", [1], _bytes_tensor(json.dumps(sampling).encode())
    )
    if config.scenario is not None:
        _add_input(request, "scenario", "BYTES", [1], _bytes_tensor(config.scenario.encode()))
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def _bytes_tensor(value: bytes) -> bytes:
    """A one-element BYTES tensor in Triton's raw form: 4-byte little-endian length, then data."""
    return len(value).to_bytes(4, "little") + value


def _add_input(
    request: service_pb2.ModelInferRequest, name: str, datatype: str, shape: list[int], raw: bytes
) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape)
    request.raw_input_contents.append(raw)


@dataclass
class _Progress:
    """Mutable state of one request while it streams; frozen into a record at the end."""

    response_s: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    final_s: float | None = None
    status: RequestStatus = "ok"
    error_kind: str | None = None
    error_message: str | None = None
    finish_reason: str | None = None


class TritonStreamClient:
    """Sends RequestSpecs to a decoupled Triton model and records their timing.

    Use as ``async with TritonStreamClient(cfg) as client: await client.send(...)``;
    the channel is closed on exit.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None

    async def __aenter__(self) -> TritonStreamClient:
        self._channel = grpc.aio.insecure_channel(
            self.config.url,
            options=[
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
            ],
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the model is ready; raise ``Unavailable`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last_error = "model not ready"
        async with InferenceServerClient(self.config.url) as admin:
            while True:
                try:
                    if await admin.is_model_ready(self.config.model):
                        return
                except Exception as e:  # any failure here means "not ready yet"
                    last_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"model {self.config.model!r} at {self.config.url} not ready after "
                        f"{timeout_s:.0f} s: {last_error}"
                    )
                await asyncio.sleep(0.25)

    async def send(self, spec: RequestSpec, t0: float, deadline: float | None) -> RequestRecord:
        """Stream one request; never raises for server errors, which go into the record.

        ``t0`` is the run's start on the perf_counter clock (record times are
        relative to it); at ``deadline`` (same clock) the request is cancelled
        and recorded with kind DEADLINE.
        """
        if self._stub is None:
            raise RuntimeError("TritonStreamClient used outside 'async with'")
        request = build_request(self.config, spec)
        finished = asyncio.Event()

        async def one_request() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield request
            # Keep our side open until the final response: half-closing early
            # may end a decoupled stream before all its responses are sent.
            await finished.wait()

        progress = _Progress()
        limit, limit_kind = self._time_limit(deadline)
        send_s = time.perf_counter() - t0
        call = self._stub.ModelStreamInfer(one_request())
        try:
            await asyncio.wait_for(self._read(call, t0, progress), timeout=limit)
        except asyncio.TimeoutError:
            progress.status, progress.error_kind = "cancelled", limit_kind
            progress.error_message = "cancelled by the client at its time limit"
            progress.final_s = time.perf_counter() - t0
        except grpc.aio.AioRpcError as e:
            progress.status, progress.error_kind = "error", e.code().name
            progress.error_message = e.details() or str(e.code())
            progress.final_s = time.perf_counter() - t0
        finally:
            finished.set()
            call.cancel()
        return RequestRecord(
            index=spec.index,
            input_len=spec.input_len,
            requested_output_len=spec.output_len,
            send_s=send_s,
            response_s=tuple(progress.response_s),
            response_tokens=tuple(progress.response_tokens),
            final_s=progress.final_s,
            status=progress.status,
            error_kind=progress.error_kind,
            error_message=progress.error_message,
            finish_reason=progress.finish_reason,
            scheduled_s=spec.arrival_s,
        )

    def _time_limit(self, deadline: float | None) -> tuple[float | None, str]:
        now = time.perf_counter()
        to_deadline = None if deadline is None else max(0.0, deadline - now)
        timeout = self.config.request_timeout_s
        if timeout is not None and (to_deadline is None or timeout < to_deadline):
            return timeout, TIMEOUT
        return to_deadline, DEADLINE

    @staticmethod
    async def _read(call: Any, t0: float, progress: _Progress) -> None:
        async for response in call:
            now = time.perf_counter() - t0
            if response.error_message:
                # An error response ends the request: no final flag follows it.
                progress.status = "error"
                progress.error_kind = classify_error_message(response.error_message)
                progress.error_message = response.error_message
                progress.final_s = now
                return
            infer_response = response.infer_response
            result = InferResult(infer_response)
            ids = result.as_numpy("output_ids")
            num_tokens = 0 if ids is None else int(ids.size)
            reason = result.as_numpy("finish_reason")
            if reason is not None and reason.size:
                value = reason.reshape(-1)[0]
                progress.finish_reason = value.decode() if isinstance(value, bytes) else str(value)
            if num_tokens or result.as_numpy("text_output") is not None:
                progress.response_s.append(now)
                progress.response_tokens.append(num_tokens)
            params = infer_response.parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                progress.final_s = now
                return
        progress.status, progress.error_kind = "error", INCOMPLETE
        progress.error_message = "stream ended without a final response"
        progress.final_s = time.perf_counter() - t0
