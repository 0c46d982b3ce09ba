"""Router role: the entry model ``pdserve`` (decoupled, BLS), DESIGN.md §4.

    1 validate + tokenize                    (requests.parse_request)
    2 pick a decode instance D, reserve KV   (op=reserve: Accepted(KVHandle); D opens
                                              its token channel to us on first use)
    3 on-demand forward to a prefill P       (scheduler.forward_on_demand: a full P
                                              rejects at once, the next P is tried)
    4 P prefills, writes the KV to D's extent, answers the first token
    5 stream the first token                 (TTFT)
    6 commit on D; D streams the rest        (op=commit; tokens on the token channel,
                                              one message per D step, token_receiver)
    7 on finish, cancel or error, D's reservation/sequence is aborted (op=abort)

With an aggregated route the request goes to one aggregated instance
(op=generate), so the baseline is served through the same entry model; its
tokens come on the token channel too.

Which instance has which role comes from the model repository, who may get
work from the controller's state file and the router's own observations, and
how loaded each one is from their heartbeats (``instance_view``): prefills are
ranked by ``rank_prefills`` (fewest in flight), decodes by ``rank_decodes``
(most free KV). With ``admission: queue`` (the measured baseline) a request
goes to the shortest prefill queue once, without retry or early intervention.

Failures: a prefill that answers with an error is skipped and
``forward_on_demand`` tries the next one. A prefill seen dead under the call
(a failed heartbeat or call, or a heartbeat answered by a new stub incarnation:
Triton 2.51 restarts a killed stub in place, and a call made to the old one is
never answered) is given up as soon as that is seen; its KV write into the
decode extent may have begun, so the reservation is aborted and the request
starts over (new reservation under a new part id "<id>~<n>", so nothing late
for the old one can reach it; same TTFT deadline). So does a request whose
decode no routable prefill can feed any more (a rolling upgrade drained the
last prefill on its weights after the decode was chosen). A decode that dies (token
channel EOF, failed call) is marked unroutable here at once, and each request it held
is RESUMED: prompt + the tokens already streamed are prefilled again and a new
decode continues, so the client's stream goes on with no duplicate or missing
token. Greedy requests continue exactly; a seeded request restarts its
generator from its seed (the per-step RNG state stays on the dead decode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdserve.engine import load_tokenizer_and_config
from pdserve.errors import Cancelled, InternalError, Unavailable
from pdserve.roles.contracts import (
    AbortCall,
    Accepted,
    CommitCall,
    GenerateCall,
    PrefillCall,
    PrefillResult,
)
from pdserve.roles.daemon_executor import DaemonExecutor
from pdserve.roles.emitter import Emitter
from pdserve.roles.instance import transfer_config
from pdserve.roles.instance_view import HEARTBEAT_S, InstanceView
from pdserve.roles.metric_buffer import MetricFlusher
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.requests import ClientRequest, Limits
from pdserve.roles.token_receiver import ChannelServer, InstanceLost, TokenStream
from pdserve.roles.triton import InstanceClient, Responder
from pdserve.scheduler.decode_choice import choose_decode
from pdserve.scheduler.forwarding import (
    ForwardingPolicy,
    PrefillCallBound,
    PrefillRejected,
    SlotSignal,
    forward_on_demand,
    rank_prefills,
    shortest_queue,
)
from pdserve.scheduler.instance import InstanceLoad, Role
from pdserve.server.config import POOL_ENV, InstanceConfig, bls_threads, server_stopping

log = logging.getLogger(__name__)

# request.is_cancelled() is an IPC round trip to tritonserver; at 50 ms it was a
# third of the router's IPC on a fast model (py-spy), so poll 5x less often.
CANCEL_POLL_S = 0.25
FAILED_HOLD_S = 10.0  # how long a decode whose channel broke is not chosen
ABORT_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 3.0
MAX_RESUMES = 3  # decode failures one request survives
MAX_PREFILL_LOSSES = 3  # prefills dying under one request before it is ended
POOL_EXIT_S = 1.0  # close: how long the BLS threads get to exit


class _LostUnderRequest(Exception):
    """Internal: an instance failed while it held part of a request."""

    def __init__(self, instance: str, cause: BaseException) -> None:
        super().__init__(f"{instance}: {cause}")
        self.instance = instance
        self.cause = cause


class PrefillLost(_LostUnderRequest):
    """A prefill died holding the request's prompt; its KV reservation is spoiled."""


class DecodeLost(_LostUnderRequest):
    """The decode serving a request failed; the request may resume elsewhere."""


class NoPrefillFeeds(PrefillLost):
    """No routable prefill serves the chosen decode's weights any more (an upgrade
    drained the last one after the decode was chosen): start over on a decode
    that one can feed."""


def is_instance_dead(exc: BaseException) -> bool:
    return isinstance(exc, InstanceLost) or (
        isinstance(exc, Unavailable) and not isinstance(exc, PrefillRejected)
        and "is not healthy" in str(exc))


class RouterRole:
    def __init__(self, cfg: InstanceConfig, repository: Path | None = None,
                 pool_threads: int | None = None) -> None:
        """``pool_threads``: the Python backend's thread pool of this model instance
        (``server.config.POOL_ENV``); None: not under Triton, no such cap."""
        self.cfg = cfg
        tokenizer, config = load_tokenizer_and_config(cfg.model)
        self.tokenizer = tokenizer
        self.layout = config.kv_layout(cfg.dtype)
        self.limits = Limits(max_context=config.max_context,
                             max_tokens_limit=cfg.max_tokens_limit,
                             vocab_size=config.vocab_size,
                             scenarios=tuple(cfg.routes))
        threads = (cfg.stream_threads if pool_threads is None
                   else bls_threads(cfg.stream_threads, pool_threads))
        if threads < cfg.stream_threads:
            log.warning(
                "%s: at most %d BLS calls at once, not stream_threads=%d: the Python backend "
                "pool has %d threads (%s; raise it with pdserve serve --pool-threads, or "
                "tritonserver --backend-config=python,thread-pool-size=N and %s=N)",
                cfg.name, threads, cfg.stream_threads, pool_threads, POOL_ENV, POOL_ENV)
        self.pool = DaemonExecutor(threads, name=f"{cfg.name}-bls")
        self.client = InstanceClient(self.pool)
        self.policy = ForwardingPolicy(ttft_budget_s=cfg.ttft_budget_s)
        self.prefill_bound = PrefillCallBound()
        # Requests waiting for a prefill slot, per scenario: woken when a call ends.
        self.slot_freed: defaultdict[str, SlotSignal] = defaultdict(SlotSignal)
        # One label set per scenario: the controller's ratio loop reads them apart.
        self.metrics_flusher = MetricFlusher(cfg.name)  # one thread for every scenario's
        self.scenario_metrics = {s: InstanceMetrics(cfg.name, s, self.metrics_flusher)
                                 for s in cfg.routes}
        self.metrics = self.scenario_metrics["default"]  # router-wide gauges and counters
        self.view = InstanceView(cfg.routes, cfg.max_batch_size, repository)
        self.num_resumes = 0
        self._num_requests = 0  # client requests in this router now (bounded-memory check)
        roles = {n: "decode" for r in cfg.routes.values() for n in r.decode}
        roles.update({n: "aggregated" for r in cfg.routes.values() for n in r.aggregated})
        self.channel = ChannelServer(cfg.name, transfer_config(cfg).secret,
                                     family=cfg.token_channel, host=cfg.token_host, roles=roles)
        self._start_lock: asyncio.Lock | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._beat_ok: dict[str, float] = {}  # instance -> start of its last good heartbeat

    async def handle(self, request: Any, req: ClientRequest, out: Responder) -> None:
        self._ensure_heartbeats()
        self.view.refresh()
        emitter = Emitter(req, self.tokenizer, out.send)
        metrics = self.scenario_metrics[req.scenario]
        metrics.offered.increment(1)
        metrics.prompt_tokens.increment(len(req.prompt_ids))
        metrics.requested_tokens.increment(req.max_tokens)
        # "abort_target": instance to abort on cancel; "stream": the id of the token
        # stream now open for it; "cancelled": set once the client is gone.
        state: dict[str, str] = {}
        watcher = asyncio.create_task(self._watch_cancel(request, req, state))
        self._num_requests += 1
        self.metrics.requests_in_flight.set(self._num_requests)
        try:
            if self.view.is_aggregated(req.scenario):
                await self._aggregated(req, emitter, state)
            else:
                await self._resumable(req, emitter, state)
            if "cancelled" in state:
                raise Cancelled(f"request {req.request_id} was cancelled by the client")
        finally:
            self._num_requests -= 1
            self.metrics.requests_in_flight.set(self._num_requests)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            metrics.generated_tokens.increment(emitter.num_tokens)
            if emitter.ttft_s is not None:
                metrics.ttft.observe(emitter.ttft_s)
            if emitter.tpot_s is not None:
                metrics.tpot.observe(emitter.tpot_s)

    # -- the two paths --------------------------------------------------------------
    async def _aggregated(self, req: ClientRequest, emitter: Emitter,
                          state: dict[str, str]) -> None:
        target = await self._choose(req, "aggregated", time.monotonic() + self.cfg.ttft_budget_s,
                                     state)
        call = GenerateCall(req.request_id, req.prompt_ids, req.sampling,
                            channel=await self._address())
        stream = self.channel.open(req.request_id, emitter.tokens)
        state["stream"] = req.request_id
        view_call = self.view.started(
            target, self.layout.extent_bytes(len(req.prompt_ids), req.max_tokens))
        try:
            accepted = Accepted.from_bytes(
                await self.client.call(target, "generate", call.to_bytes()))
            state["abort_target"] = target
            await self.channel.bind(stream, target, bytes.fromhex(accepted.incarnation))
            await self._finish(stream, emitter)
        except InstanceLost as exc:
            self.view.record_failure(target, str(exc))
            raise  # nothing left to abort there
        except BaseException:
            await self._abort(target, req.request_id)
            raise
        finally:
            self.view.finished(view_call)
            self.channel.close_stream(stream)

    async def _resumable(self, req: ClientRequest, emitter: Emitter,
                         state: dict[str, str]) -> None:
        """The disaggregated path; a lost decode resumes the request on another one."""
        part = req
        deadline = time.monotonic() + self.cfg.ttft_budget_s
        resume = prefill_losses = parts = 0
        while True:
            try:
                await self._disaggregated(part, emitter, state, deadline)
                return
            except PrefillLost as lost:
                prefill_losses += 1
                if ("cancelled" in state or prefill_losses > MAX_PREFILL_LOSSES
                        or time.monotonic() >= deadline):
                    raise Unavailable(
                        f"request could not start prefill within its TTFT budget (ended "
                        f"early rather than answered late): prefill instance {lost}") from None
                log.warning("request %s: prefill %s; starting over", req.request_id, lost)
                # A new id: the aborted reservation's stragglers (an ABORT on the
                # token channel, a write from the lost prefill) name the old one.
                parts += 1
                part = resumed(req, emitter.token_ids, parts)
            except DecodeLost as lost:
                if is_instance_dead(lost.cause):
                    self.view.record_failure(lost.instance, str(lost.cause))
                done = emitter.token_ids
                # With no other decode routable now, the resume waits (TTFT budget)
                # for one, a restarted or replaced stub of the lost one included.
                if (resume == MAX_RESUMES or "cancelled" in state
                        or len(done) >= req.max_tokens):
                    raise lost.cause from None
                resume += 1
                parts += 1
                self.num_resumes += 1
                self.scenario_metrics[req.scenario].resumed.increment(1)
                log.warning("request %s: %s; resuming after %d tokens", req.request_id, lost,
                            len(done))
                emitter.begin_part()
                part = resumed(req, done, parts)
                if done:  # a new first token of the rest; before any, the same budget
                    deadline = time.monotonic() + self.cfg.ttft_budget_s

    async def _disaggregated(self, req: ClientRequest, emitter: Emitter,
                             state: dict[str, str], deadline: float) -> None:
        began = time.monotonic()
        decode = await self._choose(req, "decode", deadline, state)
        call = GenerateCall(req.request_id, req.prompt_ids, req.sampling,
                            channel=await self._address())
        # Held until the prefill's first token went out: the decode may start
        # streaming as soon as the KV lands (decode_start: on_landing).
        stream = self.channel.open(req.request_id, emitter.tokens, hold=True)
        state["stream"] = req.request_id  # a resumed part's id ("<id>~<n>")
        view_call = self.view.started(
            decode, self.layout.extent_bytes(len(req.prompt_ids), req.max_tokens))
        step = "reserve"
        epoch = self.view.epoch(decode)

        def lost() -> bool:
            # A stub restarted in place (Triton 2.51) answers pings and heartbeats
            # again while calls made to the dead one never complete: once bound,
            # the stream's own channel tells, and before that the heartbeat's
            # stub incarnation (or a failure seen since the reserve was sent).
            # (A stream that ended well is no loss: the decode, started when the
            # KV landed, may finish a short answer before its commit is answered.)
            ended_badly = stream.done.done() and (
                stream.done.cancelled() or stream.done.exception() is not None
                or stream.done.result()[0] == "abort")
            return (ended_badly or self._decode_failed(decode)
                    or self.view.is_gone_since(decode, epoch))

        try:
            accepted = Accepted.from_bytes(
                await self.client.call(decode, "reserve", call.to_bytes(), lost=lost))
            if not accepted.handle:
                raise InternalError(f"{decode} answered reserve without a KV handle")
            state["abort_target"] = decode
            step = "bind"
            await self.channel.bind(stream, decode, bytes.fromhex(accepted.incarnation))
            if "cancelled" in state:
                await self._abort(decode, req.request_id)
                return
            step = "prefill"
            reserved = time.monotonic()
            result, sent = await self._prefill(req, accepted.handle, deadline, state, decode,
                                               lost)
            answered = time.monotonic()
            emitter.tokens([result.first_token])
            phases = self.scenario_metrics[req.scenario]
            phases.reserve.observe(reserved - began)
            phases.prefill_wait.observe(sent - reserved)
            phases.prefill_call.observe(answered - sent)
            if result.finish_reason or "cancelled" in state:
                await self._abort(decode, req.request_id)
                emitter.finish(result.finish_reason or "abort", result.text_len)
                return
            stream.release()
            step = "commit"
            # Started when the KV landed (decode_start: on_landing): its tokens are on
            # the stream already, and a decode lost now fails the stream (InstanceLost).
            if not result.started:
                if lost():  # its KV landed in a dead stub's arena: resume elsewhere
                    raise DecodeLost(decode, Unavailable(self._why_down([decode]) or "lost"))
                commit = CommitCall(req.request_id, result.first_token, result.rng_state)
                await self.client.call(decode, "commit", commit.to_bytes(), lost=lost)
            step = "stream"
            await self._finish(stream, emitter)
        except DecodeLost:
            raise
        except PrefillLost:
            await self._abort(decode, req.request_id)
            raise
        except InstanceLost as exc:
            raise DecodeLost(decode, exc) from None  # nothing left to abort there
        except Unavailable as exc:
            # Asked BEFORE the abort, and without the stream: aborting the
            # reservation ends the stream, and a prefill that never started
            # would then look like a lost decode and be resumed with a new budget.
            decode_down = self._decode_failed(decode) or self.view.is_gone_since(decode, epoch)
            await self._abort(decode, req.request_id)
            if step == "prefill" and not decode_down:
                raise  # no prefill could take it in time: the request's own end
            raise DecodeLost(decode, exc) from None
        except BaseException:
            await self._abort(decode, req.request_id)
            raise
        finally:
            self.view.finished(view_call)
            self.channel.close_stream(stream)

    async def _prefill(self, req: ClientRequest, handle: str, deadline: float,
                       state: dict[str, str], decode: str,
                       decode_lost: Callable[[], bool]) -> tuple[PrefillResult, float]:
        """The prefill's result, and when (monotonic) its accepted call was sent."""
        call = PrefillCall(req.request_id, req.prompt_ids, req.sampling, handle).to_bytes()
        accepted_sent = [0.0]

        async def attempt(name: str) -> bytes:
            if "cancelled" in state:  # no new prefill for a request nobody waits for
                raise Cancelled(f"request {req.request_id} was cancelled by the client")
            if decode_lost():  # its KV target is gone: stop trying prefills
                raise DecodeLost(decode, Unavailable(f"decode instance {decode} failed"))
            view_call = self.view.started(name)
            epoch = self.view.epoch(name)
            try:
                # Bounded (a stub restarted under this call never answers it,
                # InstanceClient), but by the start budget PLUS room for the
                # prefill: cut at the start budget, an accepted prefill ran on
                # for nobody, holding its slot (PrefillCallBound).
                # A local queue (baseline) holds a prompt up to its KV reservation's TTL.
                sent = time.monotonic()
                timeout_s = (self.cfg.kv_ttl_s if self.cfg.admission == "queue"
                             else self.prefill_bound.timeout_s(sent, deadline))
                value = await self.client.call(
                    name, "prefill", call, timeout_s=timeout_s,
                    lost=lambda: self.view.is_gone_since(name, epoch))
                self.prefill_bound.observe(time.monotonic() - sent)
                accepted_sent[0] = sent
                return value
            except PrefillRejected:
                self.metrics.prefill_rejections.increment(1)
                raise
            except Unavailable as exc:
                if is_instance_dead(exc):
                    self.view.record_failure(name, str(exc))
                if self.view.is_gone_since(name, epoch):
                    # It died holding the prompt, maybe mid-write into the decode extent.
                    raise PrefillLost(name, exc) from None
                raise
            finally:
                self.view.finished(view_call)
                self.slot_freed[req.scenario].notify()

        if self.cfg.admission == "queue":
            # Baseline: the shortest local queue (this router's counts: queued +
            # running there), one try, no early intervention; a full queue fails.
            name = shortest_queue(
                replace(load, in_flight=self.view.local_in_flight(load.name), queued=0)
                for load in self._prefills(req.scenario, decode))
            return PrefillResult.from_bytes(await attempt(name)), accepted_sent[0]

        def ranked() -> list[str]:
            # Asked every sweep: a request waiting on prefills its own router fills
            # makes no attempt that would notice the cancel.
            if "cancelled" in state:
                raise Cancelled(f"request {req.request_id} was cancelled by the client")
            loads = self._prefills(req.scenario, decode)
            if not any(load.is_routable for load in loads):
                model, served = self.view.model(decode), self._served_models(req.scenario)
                if model and served and model not in served:
                    raise NoPrefillFeeds(decode, Unavailable(
                        f"no routable prefill serves {decode}'s weights ({model}); routable "
                        f"prefills serve {sorted(served)}"))
            return rank_prefills(loads)

        result = await forward_on_demand(
            ranked, attempt, self.policy, deadline=deadline,
            is_full=self.view.is_full_here, slot_freed=self.slot_freed[req.scenario])
        return PrefillResult.from_bytes(result.value), accepted_sent[0]

    # -- helpers ----------------------------------------------------------------------
    def _decode_failed(self, decode: str) -> bool:
        return (self._channel_down(decode) is not None
                or self.view.failure(decode) is not None)

    async def _address(self) -> str:
        """The token channel's address; the server starts on the first request."""
        if self.channel.address:
            return self.channel.address
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            return await self.channel.start()

    @staticmethod
    async def _finish(stream: TokenStream, emitter: Emitter) -> None:
        reason, text_len = await stream.done
        emitter.finish(reason, text_len)

    async def _abort(self, instance: str, request_id: str) -> None:
        """Best effort and bounded: the instance may be the one that failed."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.client.call(instance, "abort", AbortCall(request_id).to_bytes()),
                ABORT_TIMEOUT_S)

    async def _watch_cancel(self, request: Any, req: ClientRequest,
                            state: dict[str, str]) -> None:
        while not request.is_cancelled():
            await asyncio.sleep(CANCEL_POLL_S)
        state["cancelled"] = "1"
        # End its token stream here at once: tokens still coming for it are dropped,
        # not sent to a client that is gone, and the request lets go of the router
        # as soon as its instance has the abort (or ABORT_TIMEOUT_S).
        stream_id = state.get("stream", req.request_id)
        self.channel.end(stream_id, Cancelled(f"request {req.request_id} was cancelled "
                                              f"by the client"))
        target = state.get("abort_target")
        if target is not None:
            await self._abort(target, stream_id)

    def _prefills(self, scenario: str, decode: str) -> list[InstanceLoad]:
        """The scenario's prefills that can hand KV to ``decode`` (same weights)."""
        model = self.view.model(decode)
        return [load for load in self.view.loads(scenario, "prefill")
                if not model or not load.model or load.model == model]

    def _served_models(self, scenario: str) -> set[str] | None:
        """Weights some routable prefill serves; None when any is unknown (no filter)."""
        models = {load.model for load in self.view.loads(scenario, "prefill")
                  if load.is_routable}
        return None if "" in models else models

    async def _choose(self, req: ClientRequest, role: Role, deadline: float,
                      state: dict[str, str]) -> str:
        """``_pick``, waiting for room (KV, batch slot) or for an instance to come
        back (from draining, reloading, a restart) while the TTFT budget allows
        and the client still waits."""
        backoff = self.policy.min_backoff_s
        while True:
            if "cancelled" in state:
                raise Cancelled(f"request {req.request_id} was cancelled by the client")
            try:
                return self._pick(req, role)
            except Unavailable as exc:
                now = time.monotonic()
                if now + backoff >= deadline:
                    raise Unavailable(
                        f"request could not find room on a {role} instance within its TTFT "
                        f"budget of {self.cfg.ttft_budget_s:g}s (ended early rather than "
                        f"answered late): {exc}") from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.policy.max_backoff_s)

    def _pick(self, req: ClientRequest, role: Role) -> str:
        """The best routable decode/aggregated instance that can hold the request's KV."""
        # Mid-upgrade, a decode no routable prefill of its weights can feed gets nothing.
        models = self._served_models(req.scenario) if role == "decode" else None
        loads: list[InstanceLoad] = []
        for load in self.view.loads(req.scenario, role):
            if self._channel_down(load.name) is not None:
                load = replace(load, healthy=False)  # its channel just broke
            elif models is not None and load.model and load.model not in models:
                load = replace(load, healthy=False)
            loads.append(load)
        if not loads:
            raise Unavailable(f"scenario {req.scenario!r} has no {role} instance")
        if not any(load.is_routable for load in loads):
            # Dead (replaced or restarted in place), draining, reloading, mid-upgrade:
            # _choose waits for one to come back within the TTFT budget.
            why = self._why_down([load.name for load in loads])
            raise Unavailable(f"no {role} instance of scenario {req.scenario!r} is routable"
                              + (f" ({why})" if why else ""))
        need = self.layout.extent_bytes(len(req.prompt_ids), req.max_tokens)
        return choose_decode(loads, need)  # raises Unavailable saying what is short

    def _channel_down(self, name: str) -> str | None:
        """Why ``name``'s token channel broke, unless a heartbeat sent after that
        was answered (a fresh stub, restarted in place or reloaded, is up; it
        opens its channel only on its next reserve, so waiting for that would
        keep it out of routing for the whole hold)."""
        why = self.channel.failure(name, FAILED_HOLD_S)
        if why is None:
            return None
        failed_at = self.channel.failed.get(name, (0.0, ""))[0]
        return None if self._beat_ok.get(name, float("-inf")) > failed_at else why

    def _why_down(self, names: list[str]) -> str | None:
        """What the router saw of the first of ``names`` that failed (channel first)."""
        for name in names:
            why = self._channel_down(name) or self.view.failure(name)
            if why:
                return why
        return None

    # -- heartbeats -------------------------------------------------------------------
    def _ensure_heartbeats(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        while not server_stopping():  # (a request after the stop's marker restarts none)
            self.view.refresh()
            await asyncio.gather(*(self._beat(n) for n in self.view.names()))
            await asyncio.sleep(HEARTBEAT_S)

    async def _beat(self, name: str) -> None:
        started = time.monotonic()
        try:
            load = await asyncio.wait_for(self.client.health(name), HEARTBEAT_TIMEOUT_S)
        except TimeoutError:
            return  # slow is not dead: a busy CPU instance may answer late
        except Exception as exc:
            self.view.record_failure(name, f"heartbeat: {exc}")
            return
        self.view.record_load(name, load)
        self._beat_ok[name] = started

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.channel.close_now()
        self.pool.shutdown(wait=False, cancel_futures=True)
        # The workers exit now, not after the stub has unmapped its shared memory
        # (daemon_executor); one blocked in a call to a dead stub never does.
        stuck = self.pool.join(POOL_EXIT_S)
        if stuck:
            log.warning("%d BLS threads still blocked in calls at close", stuck)
        self.metrics_flusher.close()


def resumed(req: ClientRequest, done: tuple[int, ...], n: int) -> ClientRequest:
    """The rest of ``req`` after ``done`` tokens: prefill prompt + done, generate the rest."""
    sampling = dict(req.sampling, max_tokens=req.max_tokens - len(done))
    return replace(req, request_id=f"{req.request_id}~{n}",
                   prompt_ids=(*req.prompt_ids, *done), sampling=sampling,
                   max_tokens=req.max_tokens - len(done))
