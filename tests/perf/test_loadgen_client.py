"""The gRPC streaming client and the ``pdserve bench`` command against a fake Triton.

The fake is a small in-process gRPC server speaking Triton's protocol
(``ModelStreamInfer`` with decoupled responses and the
``triton_final_response`` parameter, ``ModelReady``). It checks what the
client sends and lets tests script tokens, errors, stalls and cancels. The
real server is exercised by the e2e test in ``test_loadgen_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from pdserve.bench.client import ClientConfig, TritonStreamClient, classify_error_message
from pdserve.bench.records import RequestSpec
from pdserve.cli import main as pdserve_main
from pdserve.errors import Unavailable

TOKENS_PER_RESPONSE = 2


@dataclass
class Received:
    model: str
    input_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    stream: bool
    empty_final: bool


@dataclass
class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Models: fake (streams tokens), fake_slow (0.2 s per token), fake_error
    (one token, then an error), fake_nofinal (ends the stream without FINAL)."""

    received: list[Received] = field(default_factory=list)
    num_cancelled: int = 0
    num_open_streams: int = 0

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=request.name.startswith("fake"))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.num_open_streams += 1
        try:
            async for request in request_iterator:
                async for response in self._serve(request):
                    yield response
                if request.model_name == "fake_nofinal":
                    return  # the server ends the stream with no FINAL response
        except asyncio.CancelledError:
            self.num_cancelled += 1
            raise
        finally:
            self.num_open_streams -= 1

    async def _serve(self, request: Any) -> AsyncIterator[Any]:
        raws = request.raw_input_contents
        inputs = {t.name: raw for t, raw in zip(request.inputs, raws, strict=True)}
        got = Received(
            model=request.model_name,
            input_ids=np.frombuffer(inputs["input_ids"], "<i4").tolist(),
            max_tokens=int(np.frombuffer(inputs["max_tokens"], "<i4")[0]),
            sampling=json.loads(inputs["sampling_parameters"][4:]),
            stream=bool(np.frombuffer(inputs["stream"], np.bool_)[0]),
            empty_final=request.parameters["triton_enable_empty_final_response"].bool_param,
        )
        self.received.append(got)
        if not got.model.startswith("fake"):
            yield service_pb2.ModelStreamInferResponse(
                error_message=f"Request for unknown model: '{got.model}' is not found"
            )
            return
        step_s = 0.2 if got.model == "fake_slow" else 0.002
        left = got.max_tokens
        while left > 0:
            await asyncio.sleep(step_s)
            n = min(TOKENS_PER_RESPONSE, left)
            left -= n
            yield _tokens(request, list(range(100, 100 + n)))
            if got.model == "fake_error":
                yield service_pb2.ModelStreamInferResponse(
                    error_message="[UNAVAILABLE] no prefill instance accepted the request"
                )
                return
        if got.model == "fake_nofinal":
            return
        final = _tokens(request, None, finish_reason=b"length")
        final.infer_response.parameters["triton_final_response"].bool_param = True
        yield final
        # A decoupled stream stays open until the client closes it.
        await asyncio.sleep(30)


def _tokens(request: Any, ids: list[int] | None, finish_reason: bytes | None = None) -> Any:
    resp = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    if ids is not None:
        out = resp.outputs.add(name="output_ids", datatype="INT32", shape=[len(ids)])
        assert out is not None
        resp.raw_output_contents.append(np.asarray(ids, "<i4").tobytes())
    if finish_reason is not None:
        resp.outputs.add(name="finish_reason", datatype="BYTES", shape=[1])
        resp.raw_output_contents.append(len(finish_reason).to_bytes(4, "little") + finish_reason)
    resp.parameters["triton_final_response"].bool_param = False
    return service_pb2.ModelStreamInferResponse(infer_response=resp)


class FakeServer:
    """Runs FakeTriton on its own event loop in a thread (the code under test owns another)."""

    def __init__(self) -> None:
        self.servicer = FakeTriton()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _start(self) -> tuple[Any, int]:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()
    assert not server.thread.is_alive()


def _wait_streams_closed(servicer: FakeTriton, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while servicer.num_open_streams and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servicer.num_open_streams == 0, "client left streams open"


async def _send(url: str, model: str, spec: RequestSpec, **kw: Any) -> Any:
    deadline_in = kw.pop("deadline_in", None)
    async with TritonStreamClient(ClientConfig(url=url, model=model, **kw)) as client:
        t0 = time.perf_counter()
        deadline = None if deadline_in is None else t0 + deadline_in
        return await client.send(spec, t0, deadline)


def test_streamed_tokens_are_counted_and_request_is_exact(fake: FakeServer) -> None:
    record = asyncio.run(_send(fake.url, "fake", RequestSpec(7, input_len=33, output_len=5)))
    assert record.is_ok and record.error_kind is None
    assert record.response_tokens == (2, 2, 1)  # the empty final is not a token response
    assert record.output_tokens == 5 and record.finish_reason == "length"
    assert record.final_s is not None and record.final_s >= record.response_s[-1]
    got = fake.servicer.received[0]
    assert len(got.input_ids) == 33 and all(32 <= i < 127 for i in got.input_ids)
    assert got.max_tokens == 5 and got.stream and got.empty_final
    assert got.sampling["ignore_eos"] is True and got.sampling["temperature"] == 0.0
    _wait_streams_closed(fake.servicer)


def test_in_stream_error_is_recorded_by_kind(fake: FakeServer) -> None:
    record = asyncio.run(_send(fake.url, "fake_error", RequestSpec(0, 4, 8)))
    assert record.status == "error" and record.error_kind == "UNAVAILABLE"
    assert record.output_tokens == 2 and "no prefill" in (record.error_message or "")
    unknown = asyncio.run(_send(fake.url, "nomodel", RequestSpec(1, 4, 8)))
    assert unknown.error_kind == "NOT_FOUND"
    _wait_streams_closed(fake.servicer)


def test_stream_without_final_is_incomplete(fake: FakeServer) -> None:
    record = asyncio.run(_send(fake.url, "fake_nofinal", RequestSpec(0, 4, 3)))
    assert record.status == "error" and record.error_kind == "INCOMPLETE"
    assert record.output_tokens == 3


def test_deadline_and_timeout_cancel_the_stream(fake: FakeServer) -> None:
    started = time.perf_counter()
    record = asyncio.run(_send(fake.url, "fake_slow", RequestSpec(0, 4, 100), deadline_in=0.5))
    assert time.perf_counter() - started < 3.0
    assert record.status == "cancelled" and record.error_kind == "DEADLINE"
    assert 0 < record.output_tokens < 100
    timed = asyncio.run(
        _send(fake.url, "fake_slow", RequestSpec(1, 4, 100), request_timeout_s=0.3, deadline_in=5)
    )
    assert timed.error_kind == "TIMEOUT"
    _wait_streams_closed(fake.servicer)
    assert fake.servicer.num_cancelled == 2  # the server saw both cancels


def test_unreachable_server_is_an_error_record_not_a_crash() -> None:
    record = asyncio.run(_send("127.0.0.1:1", "fake", RequestSpec(0, 4, 4)))
    assert record.status == "error" and record.error_kind == "UNAVAILABLE"


def test_wait_ready_times_out_with_a_typed_error(fake: FakeServer) -> None:
    async def wait(model: str) -> None:
        async with TritonStreamClient(ClientConfig(url=fake.url, model=model)) as client:
            await client.wait_ready(0.5)

    asyncio.run(wait("fake"))
    with pytest.raises(Unavailable, match="not ready"):
        asyncio.run(wait("other"))


@pytest.mark.parametrize(
    "message,kind",
    [
        ("[StatusCode.UNAVAILABLE] overloaded", "UNAVAILABLE"),
        ("[INVALID_ARG] max_tokens must be >= 1", "INVALID_ARG"),
        ("Stub process 'pdserve_0_0' is not healthy.", "UNAVAILABLE"),
        ("request cancelled by client", "CANCELLED"),
        ("max_tokens must be positive", "INVALID_ARG"),
        ("something odd happened", "SERVER_ERROR"),
    ],
)
def test_classify_error_message(message: str, kind: str) -> None:
    assert classify_error_message(message) == kind


def test_cli_end_to_end_against_fake(fake: FakeServer, tmp_path: Path, capsys: Any) -> None:
    out_json, out_csv, plots = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "plots"
    rc = pdserve_main(
        ["bench", "--url", fake.url, "--model", "fake", "--concurrency", "3",
         "--num-requests", "12", "--warmup-requests", "2", "--input-len-mean", "20",
         "--output-len-mean", "6", "--output-len-stddev", "2", "--slo-ttft-ms", "1000",
         "--json", str(out_json), "--csv", str(out_csv), "--plot", str(plots), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Time to first token (ms)" in printed and "Goodput" in printed
    doc = json.loads(out_json.read_text())
    assert doc["config"]["mode"] == "concurrency" and doc["config"]["concurrency"] == 3
    assert doc["config"]["slo"]["ttft_ms"] == 1000
    assert doc["summary"]["num_ok"] == 12 and doc["warmup"]["num_requests"] == 2
    rows = doc["requests"]
    assert [r["output_tokens"] for r in rows] == [r["requested_output_len"] for r in rows]
    assert doc["summary"]["output_sequence_length"]["avg"] == pytest.approx(
        sum(r["output_tokens"] for r in rows) / 12
    )
    assert len(fake.servicer.received) == 14
    assert out_csv.read_text().startswith("Metric,avg")
    assert (plots / "latency_cdf.png").stat().st_size > 0
    assert (plots / "throughput.png").stat().st_size > 0
    _wait_streams_closed(fake.servicer)


def test_cli_rejects_bad_input_with_exit_code_2(tmp_path: Path, capsys: Any) -> None:
    assert pdserve_main(["bench", "--concurrency", "0"]) == 2
    assert "concurrency" in capsys.readouterr().err
    assert pdserve_main(["bench", "--trace", str(tmp_path / "none.csv")]) == 2
    assert pdserve_main(["bench", "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
