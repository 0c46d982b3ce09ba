"""The Triton glue every role shares; the ONE place errors become TritonErrors.

``Responder`` wraps a decoupled response sender so that each request ends with
exactly one FINAL flag (errors included) and is safe to use from any thread.
``InstanceClient`` makes BLS calls to P/D instances and iterates their
decoupled response streams on a dedicated pool of daemon threads. Both halves
of a call run there: the blocking ``exec(decoupled=True)`` (which returns once
the FIRST response came) and the iteration of the *synchronous* iterator it
returns. ``async_exec`` is not used: the 2.51 stub implements it with
``run_in_executor(None, ...)``, i.e. on the event loop's default executor
(min(32, cores + 4) threads: 6 here), so at most 6 BLS calls of a router could
wait at once; under a local-queue backlog every commit waited behind queued
prefill calls (E2: second tokens seconds after the first).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from pdserve.errors import Cancelled, InternalError, InvalidArgument, PdserveError, Unavailable
from pdserve.roles.contracts import Op
from pdserve.roles.daemon_executor import DaemonExecutor
from pdserve.scheduler.controller.protocol import (
    CONTROL_INPUT,
    LOAD_OUTPUT,
    ControlCall,
    parse_health_reply,
)
from pdserve.scheduler.forwarding import PrefillRejected
from pdserve.scheduler.instance import InstanceLoad

CALL_TIMEOUT_S = 30.0  # control calls answer at once; a prefill within its TTFT budget
REJECTED_MARK = "[prefill-rejected]"  # how a prefill rejection survives the BLS hop

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _code(name: str) -> Any:
    # TritonError is injected by the stub after import, so look it up late.
    return getattr(pb_utils.TritonError, name)


def error_code(exc: BaseException) -> str:
    """The Triton error code name of any exception (typed errors keep theirs)."""
    if isinstance(exc, PdserveError):
        return exc.code
    return "INVALID_ARG" if isinstance(exc, ValueError) else "INTERNAL"


def to_triton_error(exc: BaseException, code_in_message: bool = False) -> Any:
    """Map any exception to a ``pb_utils.TritonError``.

    ``code_in_message`` starts the message with ``[CODE]``: a gRPC stream
    response carries only an error *message* (Triton drops the code there), so
    clients of the router could not tell overload from a bad request otherwise.
    """
    code = error_code(exc)
    message = str(exc)
    if code == "INTERNAL" and not isinstance(exc, PdserveError):
        message = f"internal error: {type(exc).__name__}: {exc}"
    if isinstance(exc, PrefillRejected) and not code_in_message:  # for the router only
        message = f"{REJECTED_MARK} {message}"
    if code_in_message:
        message = f"[{code}] {message}"
    return pb_utils.TritonError(message, _code(code))


def from_triton_error(error: Any, instance: str) -> PdserveError:
    """A BLS error from ``instance`` -> the typed error the router acts on."""
    message = error.message()
    code = error.code()
    if message.startswith(REJECTED_MARK):
        return PrefillRejected(message[len(REJECTED_MARK):].strip())
    if code == pb_utils.TritonError.INVALID_ARG:
        return InvalidArgument(message)
    if code == pb_utils.TritonError.CANCELLED:
        return Cancelled(f"{instance}: {message}")
    return Unavailable(f"instance {instance} failed: {message}")


class Responder:
    """Sends responses of one request; guarantees one FINAL flag, thread-safe.

    ``client_facing`` (the router's requests): errors start with ``[CODE]``.
    """

    def __init__(self, request: Any, client_facing: bool = False) -> None:
        self._client_facing = client_facing
        self._sender = request.get_response_sender()
        self._lock = threading.Lock()
        self.is_final = False

    def send(self, outputs: Mapping[str, np.ndarray], final: bool = False) -> None:
        tensors = [pb_utils.Tensor(name, arr) for name, arr in outputs.items()]
        with self._lock:
            if self.is_final:
                return
            self.is_final = final
            self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                              flags=_FINAL if final else 0)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.is_final:
                return
            self.is_final = True
            error = to_triton_error(exc, code_in_message=self._client_facing)
            self._sender.send(pb_utils.InferenceResponse(error=error), flags=_FINAL)

    def close(self) -> None:
        """FINAL with no response (nothing more to say)."""
        with self._lock:
            if not self.is_final:
                self.is_final = True
                self._sender.send(flags=_FINAL)


def payload_out(data: bytes) -> dict[str, np.ndarray]:
    return {"payload": np.array([data], dtype=np.object_)}


def read_instance_request(request: Any) -> tuple[str, bytes]:
    """(op, payload) of a call to a P/D instance."""
    op = pb_utils.get_input_tensor_by_name(request, "op")
    payload = pb_utils.get_input_tensor_by_name(request, "payload")
    if op is None or payload is None:
        raise InvalidArgument("instance requests need 'op' and 'payload' inputs")
    raw_op = op.as_numpy().reshape(-1)[0]
    return (raw_op.decode() if isinstance(raw_op, bytes) else str(raw_op),
            bytes(payload.as_numpy().reshape(-1)[0]))


def read_control(request: Any) -> bytes | None:
    """The heartbeat's ``control`` input (protocol.ControlCall bytes), if present."""
    tensor = pb_utils.get_input_tensor_by_name(request, CONTROL_INPUT)
    return None if tensor is None else bytes(tensor.as_numpy().reshape(-1)[0])


def load_out(data: bytes) -> dict[str, np.ndarray]:
    return {LOAD_OUTPUT: np.array([data], dtype=np.object_)}


def read_inputs(request: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


class InstanceClient:
    """BLS calls to P/D instances; streams are iterated on ``pool`` threads.

    Liveness: when an instance's stub dies, Triton keeps the model READY and a
    BLS response iterator already open just blocks. So after ``probe_after_s``
    without a response we ping the instance; a dead stub fails the ping at once
    ("Stub process ... is not healthy") and the stream raises ``Unavailable``.
    But Triton 2.51 also restarts the stub on that request, and once the fresh
    stub answers pings the old iterator still never ends: callers bound every
    call with a timeout (``call(timeout_s=...)``) for that case.
    The thread blocked on the dead iterator cannot be woken (2.51 has no BLS
    cancel); it is a daemon, counted in ``pool.num_abandoned``. Since tokens
    travel on the token channel, only a stub dying inside a short control call
    leaves one behind.
    """

    def __init__(self, pool: DaemonExecutor, probe_after_s: float = 1.0) -> None:
        self._pool = pool
        self.probe_after_s = probe_after_s

    def _request(self, model: str, op: Op, payload: bytes) -> Any:
        return pb_utils.InferenceRequest(
            model_name=model,
            inputs=[
                pb_utils.Tensor("op", np.array([op.encode()], dtype=np.object_)),
                pb_utils.Tensor("payload", np.array([payload], dtype=np.object_)),
            ],
            requested_output_names=["payload"],
        )

    async def stream(self, model: str, op: Op, payload: bytes,
                     lost: Callable[[], bool] | None = None) -> AsyncGenerator[bytes, None]:
        """Each response payload of a decoupled call; raises the instance's error.

        ``lost()`` is asked every ``probe_after_s`` while waiting: true means the
        caller saw the instance die (its token channel broke), so stop waiting.
        """
        loop = asyncio.get_running_loop()
        responses = await self._submit(self._request(model, op, payload), model, op, lost)
        it = iter(responses)
        while True:
            pending = self._pool.submit(next, it, None)
            future = asyncio.wrap_future(pending, loop=loop)
            try:
                while True:
                    done, _ = await asyncio.wait({future}, timeout=self.probe_after_s)
                    if done:
                        break
                    if lost is not None and lost():
                        raise Unavailable(f"instance {model} failed during {op}")
                    if op != "ping":
                        await self._probe(model, lost)
            except BaseException:  # probe failed, or the caller gave up (timeout, cancel)
                self._pool.abandon(pending)
                raise
            response = future.result()
            if response is None:
                return
            if response.has_error():
                raise from_triton_error(response.error(), model)
            tensor = pb_utils.get_output_tensor_by_name(response, "payload")
            if tensor is not None:
                yield bytes(tensor.as_numpy().reshape(-1)[0])
            # A response without payload is the bare FINAL flag; the iterator ends next.

    async def _submit(self, request: Any, model: str, op: str,
                      lost: Callable[[], bool] | None) -> Any:
        """``exec`` on a pool thread, watched by ``lost``: for a decoupled callee it
        returns only once the FIRST response came, so a prefill's whole wait happens
        here, and a request queued to a stub that died (and is restarted in place)
        never returns."""
        pending = self._pool.submit(request.exec, decoupled=True)
        future = asyncio.wrap_future(pending, loop=asyncio.get_running_loop())
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=self.probe_after_s)
                if done:
                    return future.result()
                if lost is not None and lost():
                    raise Unavailable(f"instance {model} failed during {op}")
        except BaseException:
            # Abandoned (2.51 has no BLS cancel): its thread is counted, and its
            # outcome consumed when it comes.
            self._pool.abandon(pending)
            future.add_done_callback(_consume)
            raise

    async def health(self, model: str) -> InstanceLoad:
        """The heartbeat the controller sends (protocol.py), as a BLS call."""
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(CONTROL_INPUT,
                                    np.array([ControlCall().to_bytes()], dtype=np.object_))],
            requested_output_names=[LOAD_OUTPUT],
        )
        loop = asyncio.get_running_loop()
        responses = await self._submit(request, model, "health", None)
        it = iter(responses)
        load: InstanceLoad | None = None
        while True:
            # A dead stub fails at once; a live one answers from its event loop.
            response = await asyncio.wrap_future(self._pool.submit(next, it, None), loop=loop)
            if response is None:
                break
            if response.has_error():
                raise from_triton_error(response.error(), model)
            tensor = pb_utils.get_output_tensor_by_name(response, LOAD_OUTPUT)
            if tensor is not None:
                load = parse_health_reply(bytes(tensor.as_numpy().reshape(-1)[0]), model)
        if load is None:
            raise InternalError(f"instance {model} answered the heartbeat with no load")
        return load

    async def _probe(self, model: str, lost: Callable[[], bool] | None) -> None:
        # The ping watches ``lost`` too: a ping sent to a stub that is being
        # restarted in place can hang as long as the call it probes.
        await self.call(model, "ping", b"", timeout_s=30, lost=lost)

    async def call(self, model: str, op: Op, payload: bytes,
                   timeout_s: float = CALL_TIMEOUT_S,
                   lost: Callable[[], bool] | None = None) -> bytes:
        """A call answered by exactly one payload, within ``timeout_s``."""
        try:
            return await asyncio.wait_for(self._call(model, op, payload, lost),
                                          max(timeout_s, 0.0))
        except TimeoutError:
            raise Unavailable(f"instance {model} did not answer {op} within "
                              f"{timeout_s:.1f}s") from None

    async def _call(self, model: str, op: Op, payload: bytes,
                    lost: Callable[[], bool] | None) -> bytes:
        result: bytes | None = None
        async for data in self.stream(model, op, payload, lost):
            result = data
        if result is None:
            # Seen when the model is unloaded under the call (a role switch, a
            # reload): the instance went away, another one may serve it.
            raise Unavailable(f"instance {model} answered {op} with no payload")
        return result


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" log
