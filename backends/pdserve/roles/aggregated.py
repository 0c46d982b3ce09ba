"""Aggregated role: prefill and decode in one instance, chunked prefill (the baseline).

    generate -> new sequence in the continuous batch; tokens stream back
    abort    -> stop it; the batcher frees its KV
"""

from __future__ import annotations

from pdserve.engine import ContinuousBatcher, SamplingParams
from pdserve.errors import InvalidArgument
from pdserve.roles.batch_worker import BatchWorker
from pdserve.roles.common import ResponderSink, ack
from pdserve.roles.contracts import AbortCall, GenerateCall
from pdserve.roles.instance import load_engine
from pdserve.roles.metrics import InstanceMetrics
from pdserve.roles.triton import Responder
from pdserve.server.config import InstanceConfig


class AggregatedRole:
    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg = cfg
        self.engine = load_engine(cfg)
        self.metrics = InstanceMetrics(cfg.name)
        batcher = ContinuousBatcher(self.engine, max_batch_size=cfg.max_batch_size,
                                    max_step_tokens=max(cfg.max_step_tokens, cfg.max_batch_size),
                                    chunked_prefill=True)
        self.worker = BatchWorker(batcher, cfg.name, on_step=self._on_step)
        self._on_step(0)

    async def handle(self, op: str, payload: bytes, out: Responder) -> None:
        if op == "generate":
            call = GenerateCall.from_bytes(payload)
            params = SamplingParams.from_dict(call.sampling)
            seq = self.engine.new_sequence(call.request_id, list(call.prompt_ids), params)
            self.worker.add(seq, ResponderSink(out))
            self.metrics.prompt_tokens.increment(len(call.prompt_ids))
        elif op == "abort":
            self.worker.abort(AbortCall.from_bytes(payload).request_id)
            self._on_step(0)
            ack(out)
        else:
            raise InvalidArgument(f"aggregated instance {self.cfg.name} does not serve op {op!r}")

    def _on_step(self, generated: int) -> None:
        self.metrics.generated_tokens.increment(generated)
        self.metrics.running_batch.set(self.worker.batcher.num_running)
        self.metrics.set_kv(self.engine.arena.bytes_in_use, self.engine.arena.bytes_free)

    def close(self) -> None:
        self.worker.close()
