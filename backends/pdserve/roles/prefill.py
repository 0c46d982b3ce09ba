"""Prefill role: on-demand prefill, KV written straight into the decode instance's extent.

    prefill -> accepted only with a free batch slot (else rejected at once,
               UNAVAILABLE, so the router tries the next instance); prompts that
               arrive together are prefilled in one packed forward; each
               prompt's KV goes to its KVHandle (whole region, or layer by layer
               while later layers still compute); the transfer's completion
               carries the first token, so the decode starts the sequence as
               the KV lands (``decode_start: on_landing``); answers one
               PrefillResult (``started``: no commit needed).
    health  -> this instance's InstanceLoad (the controller's heartbeat).

With ``admission: queue`` (the measured baseline only) a prefill also accepts
up to ``queue_cap`` prompts beyond its batch into a local FIFO; each forward
takes at most ``max_batch_size`` of them, oldest first.

KV ownership: the local extent a prompt is prefilled into is allocated by the
engine here and released right after its transfer, on success and failure.

A prompt's batch slot is free before its answer is sent (``_answer``): the router,
hearing it, sends the next prompt at once, and must find the slot free, not be
refused because this thread had not yet taken the lock back to free it (under a
busy core that took milliseconds, and the refused request went to the back of
the router's waiters).

The end of a prompt's transfer (END, then the decode's DONE once it verified the
KV and started the sequence) and its answer run on a thread of their own (the
finisher), not on the forward's: the DONE waits for the decode process, which is
busy with its own steps under load, and the forward thread, had it waited,
could not start the prompts already waiting for the next forward. The prompt
keeps its slot and its local extent until the finisher is done with it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from pdserve.engine import SamplingParams, Sequence
from pdserve.kvtransfer.factory import make_sender
from pdserve.kvtransfer.handle import KVHandle
from pdserve.kvtransfer.transport import SendStream
from pdserve.roles.common import wrong_op
from pdserve.roles.contracts import CommitCall, PrefillCall, PrefillResult
from pdserve.roles.instance import RoleParts, engine_for, transfer_config
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.triton import Responder, payload_out
from pdserve.scheduler.forwarding import PrefillRejected
from pdserve.scheduler.instance import InstanceLoad
from pdserve.server.config import InstanceConfig

log = logging.getLogger(__name__)


@dataclass
class _Job:
    call: PrefillCall
    handle: KVHandle
    params: SamplingParams
    out: Responder
    holds_slot: bool = True  # until its answer (or the batch's end) frees it
    finishing: bool = False  # forward done; the finisher ends its transfer and answers


class PrefillRole:
    def __init__(self, cfg: InstanceConfig, parts: RoleParts | None = None) -> None:
        """``parts``: the weights and metrics of the role this instance had before
        (a switch in place); without them, loaded from ``cfg``."""
        self.cfg = cfg
        self.engine = engine_for(cfg, parts)
        self.sender = make_sender(cfg.kv_transport, self.engine.layout, self.engine.fingerprint,
                                  transfer_config(cfg))
        self.metrics = (InstanceMetrics(cfg.name, cfg.scenario) if parts is None
                        else parts.metrics)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: list[_Job] = []
        self._running = 0  # prompts in the forward now
        self._finishing = 0  # prompts past their forward, with the finisher
        # queued + running; never above max_batch_size (+ queue_cap in queue mode)
        self._in_flight = 0
        self._capacity = cfg.max_batch_size + (cfg.queue_cap if cfg.admission == "queue" else 0)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{cfg.name}-prefill", daemon=True)
        # (job, seq, first token, stream, forward s) to finish; None: stop
        self._to_finish: queue.SimpleQueue[tuple[_Job, Sequence, int, SendStream | None, float]
                                           | None] = queue.SimpleQueue()
        self._finisher = threading.Thread(target=self._finish_loop, name=f"{cfg.name}-finish",
                                          daemon=True)
        self._thread.start()
        self._finisher.start()
        self._update_kv()

    def load(self) -> InstanceLoad:
        with self._lock:
            running, queued = self._running + self._finishing, len(self._queue)
        if self.cfg.admission == "on_demand":
            # Prompts waiting for the next forward hold a batch slot already.
            running, queued = running + queued, 0
        return InstanceLoad(self.cfg.name, "prefill", self.cfg.scenario,
                            self.cfg.max_batch_size, in_flight=running, queued=queued,
                            kv_free_bytes=self.engine.arena.bytes_free,
                            kv_total_bytes=self.engine.arena.capacity, model=self.cfg.model)

    async def handle(self, op: str, payload: bytes, out: Responder) -> None:
        if op != "prefill":
            raise wrong_op(self.cfg.name, "prefill", op)
        call = PrefillCall.from_bytes(payload)
        job = _Job(call, KVHandle.from_bytes(call.handle.encode()),
                   SamplingParams.from_dict(call.sampling), out)
        with self._lock:
            if self._in_flight >= self._capacity:
                self.metrics.prefill_rejections.increment(1)
                what = "queue is full" if self.cfg.admission == "queue" else "has no free slot"
                raise PrefillRejected(
                    f"{self.cfg.name} {what} ({self._in_flight} prompts in flight)")
            self._in_flight += 1
            self._queue.append(job)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._queue:
                    self._wake.wait()
                if self._stop:
                    jobs, self._queue = self._queue, []
                    for job in jobs:
                        job.out.fail(PrefillRejected(f"{self.cfg.name} is shutting down"))
                    return
                jobs = self._queue[:self.cfg.max_batch_size]
                del self._queue[:len(jobs)]
                self._running = len(jobs)
            try:
                self._prefill(jobs)
            finally:
                with self._lock:  # the slots of jobs not answered nor finishing (none, normally)
                    for job in jobs:
                        if job.holds_slot and not job.finishing:
                            job.holds_slot = False
                            self._in_flight -= 1
                    self._running = 0
                self._update_kv()

    def _prefill(self, jobs: list[_Job]) -> None:
        seqs: list[Sequence] = []
        ready: list[_Job] = []
        for job in jobs:
            try:
                seqs.append(self.engine.new_sequence(job.call.request_id,
                                                     list(job.call.prompt_ids), job.params))
                ready.append(job)
            except Exception as exc:
                self._answer(job, exc)
        streams: dict[int, SendStream] = {}
        handed: set[int] = set()  # ids of the seqs the finisher now owns
        try:
            layerwise = self.cfg.kv_send_mode == "layerwise"
            if layerwise:
                for i, job in enumerate(ready):
                    streams[i] = self.sender.begin(job.handle, "layerwise")
            for seq in seqs:
                self.engine.allocate(seq)
            t0 = time.perf_counter()

            def on_layer_done(layer: int) -> None:
                for i, stream in list(streams.items()):
                    try:
                        stream.send_layer(layer, self.engine.kv_prompt_view(seqs[i])[layer])
                    except Exception as exc:
                        del streams[i]
                        self._answer(ready[i], exc)

            first = self.engine.prefill(seqs, on_layer_done if layerwise else None)
            prefill_s = time.perf_counter() - t0
            self.metrics.prefill_forward.observe(prefill_s)
            done = [(job, seq, first[i], streams.get(i), prefill_s)
                    for i, (job, seq) in enumerate(zip(ready, seqs, strict=True))
                    if not job.out.is_final]  # (else its transfer already failed)
            with self._lock:
                for job, *_ in done:
                    if job.holds_slot:
                        job.finishing = True
                        self._running -= 1
                        self._finishing += 1
            for item in done:
                handed.add(id(item[1]))
                self._to_finish.put(item)
        except Exception as exc:
            for i, job in enumerate(ready):
                if i in streams:
                    streams[i].abort(f"prefill failed: {exc}")
                self._answer(job, exc)
        finally:
            for seq in seqs:
                if id(seq) not in handed:
                    self.engine.release(seq)

    def _finish_loop(self) -> None:
        """The finisher: each forwarded prompt's transfer end and answer, in order;
        then its local extent is freed."""
        while (item := self._to_finish.get()) is not None:
            job, seq, first, stream, prefill_s = item
            try:
                self._finish_one(job, seq, first, stream, prefill_s)
            except Exception as exc:  # _finish_one answers a failed send itself
                log.exception("%s: finishing %s failed", self.cfg.name, job.call.request_id)
                if stream is not None:
                    stream.abort(f"prefill failed: {exc}")
                if not job.out.is_final:
                    self._answer(job, exc)
            finally:
                self.engine.release(seq)
                self._update_kv()

    def _finish_one(self, job: _Job, seq: Sequence, first: int, stream: SendStream | None,
                    prefill_s: float) -> None:
        t0 = time.perf_counter()
        rng_state = _rng_state(seq)
        notice = None
        if self.cfg.decode_start == "on_landing" and not seq.finish_reason:
            # The decode starts the sequence as the KV lands, before this answer
            # reaches the router (which then sends no commit).
            notice = CommitCall(job.call.request_id, first, rng_state).to_bytes().decode()
        try:
            if stream is not None:
                sent = stream.finish(notice)
            else:
                sent = self.sender.send(job.handle, self.engine.kv_prompt_view(seq), "whole",
                                        notice=notice)
        except Exception as exc:
            self._answer(job, exc)
            return
        transfer_s = time.perf_counter() - t0
        self.metrics.kv_transfer.observe(transfer_s)
        self.metrics.prompt_tokens.increment(seq.num_prompt_tokens)
        result = PrefillResult(job.call.request_id, first, prefill_s, transfer_s,
                               finish_reason=seq.finish_reason or "",
                               text_len=seq.stop_text_len if seq.stop_text_len is not None else -1,
                               rng_state=rng_state, started=sent.taken)
        self._answer(job, result=result.to_bytes())

    def _answer(self, job: _Job, exc: BaseException | None = None,
                result: bytes | None = None) -> None:
        """The job's one answer (``exc`` or ``result``), sent once its slot is free."""
        with self._lock:
            if job.holds_slot:
                job.holds_slot = False
                self._in_flight -= 1
                if job.finishing:
                    self._finishing -= 1
                else:
                    self._running -= 1
        if exc is not None:
            job.out.fail(exc)
        else:
            assert result is not None
            job.out.send(payload_out(result), final=True)

    def _update_kv(self) -> None:
        self.metrics.set_kv(self.engine.arena.bytes_in_use, self.engine.arena.bytes_free)

    def release(self) -> RoleParts:
        """Stop serving (queued prompts are rejected) and give back everything but
        the weights and the metrics, which are returned for the next role."""
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._to_finish.put(None)  # after the prompts it holds: each still answered
        self._finisher.join(timeout=30)
        if self._thread.is_alive() or self._finisher.is_alive():
            log.warning("%s: a prefill thread did not stop within 30 s", self.cfg.name)
        self.sender.close()
        return RoleParts(self.engine, self.metrics)

    def close(self) -> None:
        self.release().metrics.close()


def _rng_state(seq: Sequence) -> str:
    gen = seq.generator
    return "" if gen is None else bytes(gen.get_state().numpy().tobytes()).hex()
