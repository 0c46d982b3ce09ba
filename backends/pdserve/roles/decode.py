"""Decode role: reserve KV for a request, then stream its tokens from the running batch.

    reserve  -> open the token channel to the calling router (once per router),
                reserve an extent (kvtransfer receiver), answer Accepted(handle)
    (landed) -> the prefill's transfer completed with the first token and
                sampler state (``on_landed`` hook, on the receiver's thread):
                start the sequence at once, as commit does; the prefill tells
                the router, which then sends no commit
    commit   -> the KV has landed: verify, claim the extent, start the sequence
                with the first token (from prefill) in the continuous batch;
                tokens go to the router's token channel, one message per step
    abort    -> cancel the reservation or stop the sequence; ends its stream

Every call answers at once; nothing stays in flight in Triton while tokens
stream (see ``token_wire`` for why).

KV ownership: the receiver owns a reservation until ``claim``; then the
sequence does and the batcher frees it when the sequence ends. A reservation
never committed expires after ``kv_ttl_s`` (receiver TTL) and its stream ends
with an error (reaped here).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine import ContinuousBatcher, SamplingParams
from pdserve.errors import InvalidArgument, Unavailable
from pdserve.kvtransfer.factory import make_receiver
from pdserve.roles.batch_worker import BatchWorker
from pdserve.roles.common import ack, wrong_op
from pdserve.roles.contracts import AbortCall, Accepted, CommitCall, GenerateCall, TokenChunk
from pdserve.roles.instance import RoleParts, close_arena, engine_for, make_arena, transfer_config
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.token_sender import ChannelHub, ChannelSink
from pdserve.roles.triton import Responder, payload_out
from pdserve.scheduler.instance import InstanceLoad
from pdserve.server.config import InstanceConfig


@dataclass
class _Pending:
    call: GenerateCall
    params: SamplingParams
    sink: ChannelSink
    deadline: float


class DecodeRole:
    def __init__(self, cfg: InstanceConfig, parts: RoleParts | None = None) -> None:
        """``parts``: the weights and metrics of the role this instance had before
        (a switch in place); without them, loaded from ``cfg``."""
        self.cfg = cfg
        self.arena = make_arena(cfg)
        # Built half-way (a switch in place that fails, say) it gives the shm arena
        # and the receiver back: the instance goes on in its old role.
        receiver = None
        try:
            self.engine = engine_for(cfg, parts, self.arena)
            receiver = make_receiver(cfg.kv_transport, self.arena, self.engine.layout,
                                     self.engine.fingerprint, transfer_config(cfg), cfg.name)
            self.hub = ChannelHub(cfg.name, transfer_config(cfg).secret,
                                  on_broken=self._abort_many)
        except BaseException:
            if receiver is not None:
                receiver.close()
            close_arena(self.arena)
            raise
        self.receiver = receiver
        self.metrics = (InstanceMetrics(cfg.name, cfg.scenario) if parts is None
                        else parts.metrics)
        batcher = ContinuousBatcher(self.engine, max_batch_size=cfg.max_batch_size,
                                    max_step_tokens=max(cfg.max_step_tokens, cfg.max_batch_size),
                                    chunked_prefill=False)
        self.worker = BatchWorker(batcher, cfg.name, on_step=self._publish, flush=self.hub.flush)
        self._lock = threading.Lock()
        # Held from taking a reservation out of _pending until its sequence is in the
        # batch (or failed), and by abort: an abort racing a start on landing either
        # finds the reservation or finds the sequence running, never neither.
        # Re-entrant, though flushes no longer abort on the caller's thread (a broken
        # channel's on_broken runs on the hub's writer thread).
        self._starting = threading.RLock()
        self._pending: dict[str, _Pending] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name=f"{cfg.name}-reaper",
                                        daemon=True)
        self._reaper.start()
        receiver.on_landed = self._on_landed
        self._update_kv()

    async def handle(self, op: str, payload: bytes, out: Responder) -> None:
        if op == "reserve":
            call = GenerateCall.from_bytes(payload)
            if not call.channel:
                raise InvalidArgument("reserve needs the router's token channel address")
            await self.hub.ensure(call.channel)
            self._reserve(call, out)
        elif op == "commit":
            self._commit(CommitCall.from_bytes(payload))
            ack(out)
        elif op == "abort":
            self.abort(AbortCall.from_bytes(payload).request_id)
            ack(out)
        else:
            raise wrong_op(self.cfg.name, "decode", op)

    def _reserve(self, call: GenerateCall, out: Responder) -> None:
        params = SamplingParams.from_dict(call.sampling)
        # Validates the prompt against the model (ids, context) before taking KV.
        self.engine.new_sequence(call.request_id, list(call.prompt_ids), params)
        handle = self.receiver.reserve(call.request_id, len(call.prompt_ids), params.max_tokens,
                                       ttl_s=self.cfg.kv_ttl_s)
        try:
            sink = self.hub.sink(call.channel, call.request_id)
        except BaseException:
            self.receiver.cancel(call.request_id)
            raise
        with self._lock:
            self._pending[call.request_id] = _Pending(
                call, params, sink, time.monotonic() + 2 * self.cfg.kv_ttl_s)
        self._update_kv()
        accepted = Accepted(self.hub.incarnation.hex(), handle.to_bytes().decode())
        out.send(payload_out(accepted.to_bytes()), final=True)

    def _commit(self, call: CommitCall) -> None:
        with self._lock:
            pending = self._pending.pop(call.request_id, None)
        if pending is None:
            raise InvalidArgument(f"no reservation for request {call.request_id!r} to commit")
        try:
            self.receiver.wait(call.request_id, timeout_s=self.cfg.kv_ttl_s)  # verified landing
        except BaseException as exc:
            self.receiver.cancel(call.request_id)
            pending.sink.fail(exc)
            self.hub.flush(wait=False)
            raise
        with self._starting:
            self._start(call, pending)

    def _on_landed(self, request_id: str, notice: str) -> bool:
        """Receiver hook: the KV of ``request_id`` landed with the prefill's first
        token. Start the sequence now; False (nothing taken) if the reservation
        is gone (aborted) or the notice is not a commit for it."""
        try:
            call = CommitCall.from_bytes(notice.encode())
        except InvalidArgument:
            return False
        if call.request_id != request_id:
            return False
        with self._starting:
            with self._lock:
                pending = self._pending.pop(request_id, None)
            if pending is None:
                return False
            # On failure _start ended the stream with the error: the router learns it
            # there, and the request counts as taken (no commit follows).
            with contextlib.suppress(Exception):
                self._start(call, pending)
                self.metrics.started_on_landing.increment(1)
        self._update_kv()
        return True

    def _start(self, call: CommitCall, pending: _Pending) -> None:
        """Claim the landed extent and put the sequence into the running batch;
        on failure the reservation is freed and the stream ends with the error."""
        try:
            extent = self.receiver.claim(call.request_id)
        except BaseException as exc:
            self.receiver.cancel(call.request_id)
            pending.sink.fail(exc)
            self.hub.flush(wait=False)
            raise
        try:
            seq = self.engine.new_sequence(call.request_id, list(pending.call.prompt_ids),
                                           pending.params, extent=extent)
            seq.num_cached_tokens = seq.num_prompt_tokens
            seq.output_ids.append(call.first_token)
            if call.rng_state and seq.generator is not None:
                state = bytearray.fromhex(call.rng_state)
                seq.generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
            if pending.params.stop:  # stop strings see the first token's text too
                seq.output_text = self.engine.tokenizer.decode([call.first_token])
            self.worker.add(seq, pending.sink)
        except BaseException as exc:
            self.arena.free(extent)
            pending.sink.fail(exc)
            self.hub.flush(wait=False)
            raise
        self.metrics.prompt_tokens.increment(len(pending.call.prompt_ids))

    def abort(self, request_id: str) -> None:
        with self._starting:
            with self._lock:
                pending = self._pending.pop(request_id, None)
            if pending is not None:
                self.receiver.cancel(request_id)
                pending.sink.chunk(TokenChunk(finish_reason="abort"), final=True)
                self.hub.flush(wait=False)
            else:
                self.worker.abort(request_id)
        self._update_kv()

    def _abort_many(self, request_ids: list[str]) -> None:
        """Their router's channel broke: nobody reads these streams, free their KV."""
        for rid in request_ids:
            self.abort(rid)

    def _reap(self) -> None:
        """End reservations nobody committed (router or prefill gone)."""
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                expired = [rid for rid, p in self._pending.items() if p.deadline < now]
                dead = [self._pending.pop(rid) for rid in expired]
            for rid, pending in zip(expired, dead, strict=True):
                self.receiver.cancel(rid)
                pending.sink.fail(Unavailable(f"KV reservation for {rid!r} was never committed"))
            if dead:
                self.hub.flush(wait=False)
                self._update_kv()

    def _publish(self, generated: int) -> None:
        self.metrics.generated_tokens.increment(generated)
        self.metrics.running_batch.set(self.worker.batcher.num_running)
        self._update_kv()

    def _update_kv(self) -> None:
        self.metrics.set_kv(self.arena.bytes_in_use, self.arena.bytes_free)

    def load(self) -> InstanceLoad:
        """Heartbeat: reserved + running sequences; KV free as the arena sees it."""
        with self._lock:
            pending = len(self._pending)
        return InstanceLoad(self.cfg.name, "decode", self.cfg.scenario, self.cfg.max_batch_size,
                            in_flight=pending + self.worker.num_streams,
                            kv_free_bytes=self.arena.bytes_free,
                            kv_total_bytes=self.arena.capacity, model=self.cfg.model)

    def stats(self) -> dict[str, Any]:
        return {"pending": len(self._pending), "streams": self.worker.num_streams}

    def release(self) -> RoleParts:
        """Stop serving (reservations end with UNAVAILABLE, streams stop), free the
        arena and the channels; the weights and the metrics are returned for the
        next role."""
        self._stop.set()
        self._reaper.join(timeout=5)
        with self._lock:
            pending = list(self._pending.items())
            self._pending.clear()
        for rid, p in pending:
            self.receiver.cancel(rid)
            p.sink.fail(Unavailable("decode instance is shutting down"))
        self.worker.close()
        self.hub.close()
        self.receiver.close()
        close_arena(self.arena)
        return RoleParts(self.engine, self.metrics)

    def close(self) -> None:
        self.release().metrics.close()
