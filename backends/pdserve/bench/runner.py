"""Load modes: closed-loop concurrency and open-loop arrivals (rate or trace).

The runner only decides *when* each request is sent; the sender (the gRPC
client, or a fake in tests) does the sending and returns a RequestRecord.

Closed loop: ``concurrency`` workers each send their next request as soon as
the previous one ends, so at most ``concurrency`` are in flight.
Open loop: each request goes at ``t0 + arrival_s`` whether or not earlier ones
have finished, so the offered load does not bend to the server's speed.

Bounded by the workload's length and by ``max_duration_s``: after the
deadline nothing new is sent and in-flight requests are cancelled by the
sender (recorded as kind DEADLINE), so a run always stops by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from pdserve.bench.progress import Progress
from pdserve.bench.records import RequestRecord, RequestSpec

LoadMode = Literal["concurrency", "request_rate", "trace"]
CLIENT_ERROR = "CLIENT_ERROR"  # the sender itself failed (a bug or a local resource limit)

# sender(spec, t0, deadline) -> record; t0 and deadline on the perf_counter clock.
Sender = Callable[[RequestSpec, float, "float | None"], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class LoadConfig:
    mode: LoadMode
    concurrency: int = 1
    max_duration_s: float | None = None
    warmup_requests: int = 0
    warmup_concurrency: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("concurrency", "request_rate", "trace"):
            raise ValueError(f"unknown load mode {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"max_duration_s must be > 0, got {self.max_duration_s}")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be >= 0, got {self.warmup_requests}")
        if self.warmup_concurrency < 1:
            raise ValueError(f"warmup_concurrency must be >= 1, got {self.warmup_concurrency}")

    @property
    def is_open_loop(self) -> bool:
        return self.mode != "concurrency"


@dataclass(frozen=True)
class RunResult:
    records: tuple[RequestRecord, ...]  # measured requests, by index
    warmup_records: tuple[RequestRecord, ...]
    started_at: str  # wall-clock ISO time of t0, for the report
    wall_s: float  # t0 to the last request's end
    deadline_hit: bool


async def run_load(
    specs: Iterable[RequestSpec],
    config: LoadConfig,
    sender: Sender,
    warmup_specs: Sequence[RequestSpec] = (),
    progress: Progress | None = None,
) -> RunResult:
    """Warm up (closed loop, records kept apart), then run the measured load."""
    warmup: list[RequestRecord] = []
    if warmup_specs:
        warmup = await _closed_loop(
            warmup_specs, config.warmup_concurrency, sender, time.perf_counter(), None, None
        )
    started_at = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    deadline = None if config.max_duration_s is None else t0 + config.max_duration_s
    if config.is_open_loop:
        records = await _open_loop(specs, sender, t0, deadline, progress)
    else:
        records = await _closed_loop(specs, config.concurrency, sender, t0, deadline, progress)
    wall_s = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    return RunResult(
        records=tuple(records),
        warmup_records=tuple(sorted(warmup, key=lambda r: r.index)),
        started_at=started_at,
        wall_s=wall_s,
        deadline_hit=deadline is not None and time.perf_counter() >= deadline,
    )


async def _send(
    sender: Sender, spec: RequestSpec, t0: float, deadline: float | None, progress: Progress | None
) -> RequestRecord:
    """Call the sender; a failure of the sender itself becomes a CLIENT_ERROR record."""
    if progress is not None:
        progress.started()
    send_s = time.perf_counter() - t0
    try:
        record = await sender(spec, t0, deadline)
    except Exception as e:
        end_s = max(send_s, time.perf_counter() - t0)
        record = RequestRecord(
            index=spec.index,
            input_len=spec.input_len,
            requested_output_len=spec.output_len,
            send_s=send_s,
            response_s=(),
            response_tokens=(),
            final_s=end_s,
            status="error",
            error_kind=CLIENT_ERROR,
            error_message=f"{type(e).__name__}: {e}",
            scheduled_s=spec.arrival_s,
        )
    if progress is not None:
        progress.finished(record)
    return record


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


async def _closed_loop(
    specs: Iterable[RequestSpec],
    concurrency: int,
    sender: Sender,
    t0: float,
    deadline: float | None,
    progress: Progress | None,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    # One shared iterator: workers take turns on one event loop, so next() needs no lock.
    it = iter(specs)

    async def worker() -> None:
        while not _past(deadline):
            spec = next(it, None)
            if spec is None:
                return
            records.append(await _send(sender, spec, t0, deadline, progress))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _open_loop(
    specs: Iterable[RequestSpec],
    sender: Sender,
    t0: float,
    deadline: float | None,
    progress: Progress | None,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    in_flight: set[asyncio.Task[RequestRecord]] = set()

    def collect(task: asyncio.Task[RequestRecord]) -> None:
        in_flight.discard(task)
        if not task.cancelled():
            records.append(task.result())

    try:
        for spec in specs:
            if spec.arrival_s is None:
                raise ValueError(f"open-loop request {spec.index} has no arrival time")
            send_at = t0 + spec.arrival_s
            if deadline is not None and send_at >= deadline:
                break
            delay = send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(_send(sender, spec, t0, deadline, progress))
            in_flight.add(task)
            task.add_done_callback(collect)
        if in_flight:
            await asyncio.gather(*list(in_flight))
    finally:
        # Only reached with tasks left on an exception or cancel (e.g. Ctrl-C).
        for task in list(in_flight):
            task.cancel()
        if in_flight:
            await asyncio.gather(*list(in_flight), return_exceptions=True)
    return records
