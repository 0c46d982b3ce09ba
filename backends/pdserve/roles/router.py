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

An instance whose channel hit EOF (its stub died) fails every request it was
streaming at once, and requests that would go to it fail fast for
``FAILED_HOLD_S`` (or until a fresh stub of it connects); moving a request to
another decode instance is the next issue's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
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
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.requests import ClientRequest, Limits
from pdserve.roles.token_receiver import ChannelServer, InstanceLost, TokenStream
from pdserve.roles.triton import InstanceClient, Responder
from pdserve.scheduler.forwarding import (
    ForwardingPolicy,
    PrefillRejected,
    forward_on_demand,
    shortest_queue,
)
from pdserve.scheduler.instance import InstanceLoad
from pdserve.server.config import InstanceConfig, Route

# request.is_cancelled() is an IPC round trip to tritonserver; at 50 ms it was a
# third of the router's IPC on a fast model (py-spy), so poll 5x less often.
CANCEL_POLL_S = 0.25
FAILED_HOLD_S = 10.0  # how long a decode whose channel broke is not chosen
ABORT_TIMEOUT_S = 5.0


class RouterRole:
    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg = cfg
        tokenizer, config = load_tokenizer_and_config(cfg.model)
        self.tokenizer = tokenizer
        self.limits = Limits(max_context=config.max_context,
                             max_tokens_limit=cfg.max_tokens_limit,
                             vocab_size=config.vocab_size,
                             scenarios=tuple(cfg.routes))
        self.pool = DaemonExecutor(cfg.stream_threads, name=f"{cfg.name}-bls")
        self.client = InstanceClient(self.pool)
        self.policy = ForwardingPolicy(ttft_budget_s=cfg.ttft_budget_s)
        self.metrics = InstanceMetrics(cfg.name)
        self._in_flight: dict[str, int] = defaultdict(int)
        roles = {n: "decode" for r in cfg.routes.values() for n in r.decode}
        roles.update({n: "aggregated" for r in cfg.routes.values() for n in r.aggregated})
        self.channel = ChannelServer(cfg.name, transfer_config(cfg).secret,
                                     family=cfg.token_channel, host=cfg.token_host, roles=roles)
        self._start_lock: asyncio.Lock | None = None

    async def handle(self, request: Any, req: ClientRequest, out: Responder) -> None:
        route = self.cfg.routes[req.scenario]
        emitter = Emitter(req, self.tokenizer, out.send)
        self.metrics.prompt_tokens.increment(len(req.prompt_ids))
        state: dict[str, str] = {}  # "abort_target": instance to abort on cancel
        watcher = asyncio.create_task(self._watch_cancel(request, req, state))
        try:
            if route.is_aggregated:
                await self._aggregated(req, route, emitter, state)
            else:
                await self._disaggregated(req, route, emitter, state)
            if "cancelled" in state:
                raise Cancelled(f"request {req.request_id} was cancelled by the client")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.metrics.generated_tokens.increment(emitter.num_tokens)
            if emitter.ttft_s is not None:
                self.metrics.ttft.observe(emitter.ttft_s)
            if emitter.tpot_s is not None:
                self.metrics.tpot.observe(emitter.tpot_s)

    # -- the two paths --------------------------------------------------------------
    async def _aggregated(self, req: ClientRequest, route: Route, emitter: Emitter,
                          state: dict[str, str]) -> None:
        target = self._pick(route.aggregated)
        call = GenerateCall(req.request_id, req.prompt_ids, req.sampling,
                            channel=await self._address())
        stream = self.channel.open(req.request_id, emitter.tokens)
        self._in_flight[target] += 1
        try:
            accepted = Accepted.from_bytes(
                await self.client.call(target, "generate", call.to_bytes()))
            state["abort_target"] = target
            await self.channel.bind(stream, target, bytes.fromhex(accepted.incarnation))
            await self._finish(stream, emitter)
        except InstanceLost:
            raise  # nothing left to abort there
        except BaseException:
            await self._abort(target, req.request_id)
            raise
        finally:
            self._in_flight[target] -= 1
            self.channel.close_stream(stream)

    async def _disaggregated(self, req: ClientRequest, route: Route, emitter: Emitter,
                             state: dict[str, str]) -> None:
        decode = self._pick(route.decode)
        call = GenerateCall(req.request_id, req.prompt_ids, req.sampling,
                            channel=await self._address())
        stream = self.channel.open(req.request_id, emitter.tokens)
        self._in_flight[decode] += 1
        try:
            accepted = Accepted.from_bytes(
                await self.client.call(decode, "reserve", call.to_bytes()))
            if not accepted.handle:
                raise InternalError(f"{decode} answered reserve without a KV handle")
            state["abort_target"] = decode
            await self.channel.bind(stream, decode, bytes.fromhex(accepted.incarnation))
            if "cancelled" in state:
                await self._abort(decode, req.request_id)
                return
            result = await self._prefill(req, route, accepted.handle)
            emitter.tokens([result.first_token])
            if result.finish_reason or "cancelled" in state:
                await self._abort(decode, req.request_id)
                emitter.finish(result.finish_reason or "abort", result.text_len)
                return
            commit = CommitCall(req.request_id, result.first_token, result.rng_state)
            await self.client.call(decode, "commit", commit.to_bytes())
            await self._finish(stream, emitter)
        except InstanceLost:
            raise  # the decode stub is gone: nothing left to abort there
        except BaseException:
            await self._abort(decode, req.request_id)
            raise
        finally:
            self._in_flight[decode] -= 1
            self.channel.close_stream(stream)

    async def _prefill(self, req: ClientRequest, route: Route, handle: str) -> PrefillResult:
        call = PrefillCall(req.request_id, req.prompt_ids, req.sampling, handle).to_bytes()

        async def attempt(name: str) -> bytes:
            self._in_flight[name] += 1
            try:
                return await self.client.call(name, "prefill", call)
            except PrefillRejected:
                self.metrics.prefill_rejections.increment(1)
                raise
            finally:
                self._in_flight[name] -= 1

        if self.cfg.admission == "queue":
            # Baseline: the shortest local queue (router-side counts: queued +
            # running there), one try, no early intervention; a full queue fails.
            name = shortest_queue(
                InstanceLoad(n, "prefill", req.scenario, self.cfg.max_batch_size,
                             in_flight=self._in_flight[n]) for n in route.prefill)
            return PrefillResult.from_bytes(await attempt(name))
        result = await forward_on_demand(
            lambda: sorted(route.prefill, key=lambda n: self._in_flight[n]), attempt,
            self.policy, deadline=time.monotonic() + self.cfg.ttft_budget_s)
        return PrefillResult.from_bytes(result.value)

    # -- helpers ----------------------------------------------------------------------
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
        target = state.get("abort_target")
        if target is not None:
            await self._abort(target, req.request_id)

    def _pick(self, names: tuple[str, ...]) -> str:
        """Least loaded instance whose channel has not just broken; else fail fast."""
        healthy = [n for n in names if self.channel.failure(n, FAILED_HOLD_S) is None]
        if not healthy:
            reason = self.channel.failure(names[0], FAILED_HOLD_S)
            raise Unavailable(reason or f"no instance of {list(names)} is available")
        return min(healthy, key=lambda n: self._in_flight[n])

    def close(self) -> None:
        self.channel.close_now()
        self.pool.shutdown(wait=False, cancel_futures=True)
