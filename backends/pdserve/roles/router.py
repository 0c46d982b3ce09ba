"""Router role: the entry model ``pdserve`` (decoupled, BLS), DESIGN.md §4.

    1 validate + tokenize                    (requests.parse_request)
    2 pick a decode instance D, reserve KV   (op=reserve: first response = KVHandle)
    3 on-demand forward to a prefill P       (scheduler.forward_on_demand: a full P
                                              rejects at once, the next P is tried)
    4 P prefills, writes the KV to D's extent, answers the first token
    5 stream the first token                 (TTFT)
    6 commit on D; D streams the rest        (op=commit, tokens on the reserve stream)
    7 on finish, cancel or error, D's reservation/sequence is aborted (op=abort)

With an aggregated route the request goes to one aggregated instance
(op=generate), so the baseline is served through the same entry model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdserve.engine import LLMEngine
from pdserve.errors import Cancelled, InternalError
from pdserve.roles.contracts import (
    AbortCall,
    CommitCall,
    GenerateCall,
    PrefillCall,
    PrefillResult,
    TokenChunk,
)
from pdserve.roles.emitter import Emitter
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.requests import ClientRequest, Limits
from pdserve.roles.triton import InstanceClient, Responder
from pdserve.scheduler.forwarding import ForwardingPolicy, PrefillRejected, forward_on_demand
from pdserve.server.config import InstanceConfig, Route

CANCEL_POLL_S = 0.05


class RouterRole:
    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg = cfg
        # The router only needs the tokenizer and the model's limits; a tiny arena
        # keeps the KV cost of loading the engine negligible.
        engine = LLMEngine.load(cfg.model, dtype=cfg.dtype, device="cpu",
                                kv_capacity_bytes=1 << 16)
        self.tokenizer = engine.tokenizer
        self.limits = Limits(max_context=engine.max_context,
                             max_tokens_limit=cfg.max_tokens_limit,
                             vocab_size=engine.config.vocab_size,
                             scenarios=tuple(cfg.routes))
        del engine
        self.pool = ThreadPoolExecutor(max_workers=cfg.stream_threads,
                                       thread_name_prefix=f"{cfg.name}-bls")
        self.client = InstanceClient(self.pool)
        self.policy = ForwardingPolicy(ttft_budget_s=cfg.ttft_budget_s)
        self.metrics = InstanceMetrics(cfg.name)
        self._in_flight: dict[str, int] = defaultdict(int)

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
        target = self._least_loaded(route.aggregated)
        call = GenerateCall(req.request_id, req.prompt_ids, req.sampling)
        self._in_flight[target] += 1
        try:
            state["abort_target"] = target
            await self._relay(self.client.stream(target, "generate", call.to_bytes()), emitter)
        except BaseException:
            await self._abort(target, req.request_id)
            raise
        finally:
            self._in_flight[target] -= 1

    async def _disaggregated(self, req: ClientRequest, route: Route, emitter: Emitter,
                             state: dict[str, str]) -> None:
        decode = self._least_loaded(route.decode)
        call = GenerateCall(req.request_id, req.prompt_ids, req.sampling)
        stream = self.client.stream(decode, "reserve", call.to_bytes())
        self._in_flight[decode] += 1
        try:
            reserved = TokenChunk.from_bytes(await anext(stream))
            if not reserved.handle:
                raise InternalError(f"{decode} answered reserve without a KV handle")
            state["abort_target"] = decode
            if "cancelled" in state:
                await self._abort(decode, req.request_id)
                await self._drain(stream)
                return
            result = await self._prefill(req, route, reserved.handle)
            emitter.tokens([result.first_token])
            if result.finish_reason or "cancelled" in state:
                await self._abort(decode, req.request_id)
                await self._drain(stream)
                emitter.finish(result.finish_reason or "abort", result.text_len)
                return
            commit = CommitCall(req.request_id, result.first_token, result.rng_state)
            await self.client.call(decode, "commit", commit.to_bytes())
            await self._relay(stream, emitter)
        except BaseException:
            await self._abort(decode, req.request_id)
            raise
        finally:
            self._in_flight[decode] -= 1
            await stream.aclose()

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

        result = await forward_on_demand(
            lambda: sorted(route.prefill, key=lambda n: self._in_flight[n]), attempt,
            self.policy, deadline=time.monotonic() + self.cfg.ttft_budget_s)
        return PrefillResult.from_bytes(result.value)

    # -- helpers ----------------------------------------------------------------------
    async def _relay(self, stream: AsyncIterator[bytes], emitter: Emitter) -> None:
        async for data in stream:
            chunk = TokenChunk.from_bytes(data)
            emitter.tokens(chunk.token_ids)
            if chunk.finish_reason:
                emitter.finish(chunk.finish_reason, chunk.text_len)
                return
        raise InternalError("instance stream ended without a finish reason")

    async def _drain(self, stream: AsyncIterator[bytes]) -> None:
        async for _ in stream:
            pass

    async def _abort(self, instance: str, request_id: str) -> None:
        """Best effort: the instance may be the one that failed."""
        with contextlib.suppress(Exception):
            await self.client.call(instance, "abort", AbortCall(request_id).to_bytes())

    async def _watch_cancel(self, request: Any, req: ClientRequest,
                            state: dict[str, str]) -> None:
        while not request.is_cancelled():
            await asyncio.sleep(CANCEL_POLL_S)
        state["cancelled"] = "1"
        target = state.get("abort_target")
        if target is not None:
            await self._abort(target, req.request_id)

    def _least_loaded(self, names: tuple[str, ...]) -> str:
        return min(names, key=lambda n: self._in_flight[n])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
