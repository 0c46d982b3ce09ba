"""Aggregated role: prefill and decode in one instance, chunked prefill (the baseline).

    generate -> open the token channel to the calling router (once per router),
                add a new sequence to the continuous batch, answer Accepted;
                tokens go to the channel, one message per router per step
    abort    -> stop it; the batcher frees its KV
"""

from __future__ import annotations

from pdserve.engine import ContinuousBatcher, SamplingParams
from pdserve.errors import InvalidArgument
from pdserve.roles.batch_worker import BatchWorker
from pdserve.roles.common import ack
from pdserve.roles.contracts import AbortCall, Accepted, GenerateCall
from pdserve.roles.instance import load_engine, transfer_config
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.token_sender import ChannelHub
from pdserve.roles.triton import Responder, payload_out
from pdserve.scheduler.instance import InstanceLoad
from pdserve.server.config import InstanceConfig


class AggregatedRole:
    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg = cfg
        self.engine = load_engine(cfg)
        self.metrics = InstanceMetrics(cfg.name, cfg.scenario)
        self.hub = ChannelHub(cfg.name, transfer_config(cfg).secret, on_broken=self._abort_many)
        batcher = ContinuousBatcher(self.engine, max_batch_size=cfg.max_batch_size,
                                    max_step_tokens=max(cfg.max_step_tokens, cfg.max_batch_size),
                                    chunked_prefill=True)
        self.worker = BatchWorker(batcher, cfg.name, on_step=self._publish, flush=self.hub.flush)
        self._publish(0)

    async def handle(self, op: str, payload: bytes, out: Responder) -> None:
        if op == "generate":
            call = GenerateCall.from_bytes(payload)
            if not call.channel:
                raise InvalidArgument("generate needs the router's token channel address")
            params = SamplingParams.from_dict(call.sampling)
            seq = self.engine.new_sequence(call.request_id, list(call.prompt_ids), params)
            await self.hub.ensure(call.channel)
            self.worker.add(seq, self.hub.sink(call.channel, call.request_id))
            self.metrics.prompt_tokens.increment(len(call.prompt_ids))
            out.send(payload_out(Accepted(self.hub.incarnation.hex()).to_bytes()), final=True)
        elif op == "abort":
            self.worker.abort(AbortCall.from_bytes(payload).request_id)
            self._publish(0)
            ack(out)
        else:
            raise InvalidArgument(f"aggregated instance {self.cfg.name} does not serve op {op!r}")

    def load(self) -> InstanceLoad:
        arena = self.engine.arena
        return InstanceLoad(self.cfg.name, "aggregated", self.cfg.scenario,
                            self.cfg.max_batch_size, in_flight=self.worker.num_streams,
                            kv_free_bytes=arena.bytes_free, kv_total_bytes=arena.capacity,
                            model=self.cfg.model)

    def _abort_many(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.worker.abort(rid)

    def _publish(self, generated: int) -> None:
        self.metrics.generated_tokens.increment(generated)
        self.metrics.running_batch.set(self.worker.batcher.num_running)
        self.metrics.set_kv(self.engine.arena.bytes_in_use, self.engine.arena.bytes_free)

    def close(self) -> None:
        self.worker.close()
        self.hub.close()
        self.metrics.close()
