"""Prefill + KV transfer end to end, whole-request vs layer-wise (part of perf.kv_transfer).

The prefill process (the benchmark's child) runs the real engine
(``pdserve.engine``, ``--overlap-model``, one prompt per batch) into its own
arena and sends the prompt's KV to the decode process's receiver:

    whole                  prefill(seq), then sender.send(kv, "whole")
    layerwise_inline       each layer sent from on_layer_done, on the engine thread
                           (compute waits for every write)
    layerwise_background   on_layer_done queues the layer on a BackgroundStream;
                           its worker thread sends while the next layer computes

Per run, on the prefill side: ``total_s`` (prefill start -> receiver verified),
``prefill_s`` (prefill start -> first token) and ``exposed_s`` = total - prefill,
the transfer time the request still waits for after compute. ``exposed_s`` is
measured inside one run, so the prefill's own run-to-run noise (seconds on a
shared CPU) does not hide a millisecond-scale difference; ``total_s`` is the
end-to-end figure and carries that noise.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from pdserve.kvtransfer import (
    Arena,
    BackgroundStream,
    KVHandle,
    ShmArena,
    TransferConfig,
    make_receiver,
)

OVERLAP_MODES = ("whole", "layerwise_inline", "layerwise_background")


class OverlapRunner:
    """Child side: one engine, prefill + send on request."""

    def __init__(self, model: str) -> None:
        from pdserve.engine import LLMEngine

        self.engine = LLMEngine.load(model, kv_capacity_bytes=256 << 20)

    def run(self, sender: Any, handle: KVHandle, mode: str, seed: int) -> dict[str, float]:
        from pdserve.engine import SamplingParams

        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 256, (handle.prompt_tokens,), generator=gen).tolist()
        seq = self.engine.new_sequence(handle.request_id, prompt, SamplingParams(max_tokens=1))
        self.engine.allocate(seq)
        try:
            start = time.perf_counter()
            if mode == "whole":
                self.engine.prefill([seq])
                prefill_done = time.perf_counter()
                sender.send(handle, self.engine.kv_prompt_view(seq), "whole")
            else:
                stream = sender.begin(handle, "layerwise")
                if mode == "layerwise_background":
                    stream = BackgroundStream(stream, handle.request_id)
                view = self.engine.kv_prompt_view(seq)  # [L, 2, Tp, Hkv, D]
                with stream:
                    self.engine.prefill([seq], lambda layer: stream.send_layer(layer, view[layer]))
                    prefill_done = time.perf_counter()
                    stream.finish()
            end = time.perf_counter()
        finally:
            self.engine.release(seq)  # only after the transfer: the stream reads this extent
        return {"total_s": end - start, "prefill_s": prefill_done - start,
                "exposed_s": end - prefill_done}


def measure_overlap(conn: Any, reply: Any, kinds: list[str], model_layout: Any,
                    fingerprint: str, secret: bytes, lengths: tuple[int, ...],
                    repeats: int) -> dict[str, Any]:
    """Parent side: a receiver per transport; the child prefills and sends."""
    out: dict[str, Any] = {}
    capacity = model_layout.extent_bytes(max(lengths), 1) + (1 << 20)
    for kind in kinds:
        arena: Arena = ShmArena(capacity) if kind == "shm" else Arena(capacity)
        arena.buffer.fill_(0)
        receiver = make_receiver(kind, arena, model_layout, fingerprint, TransferConfig(secret))
        rows: dict[str, Any] = {}
        try:
            for tp in lengths:
                row: dict[str, Any] = {"nbytes": model_layout.region_bytes(tp)}
                for mode in OVERLAP_MODES:
                    runs = []
                    for i in range(repeats + (1 if tp == lengths[0] else 0)):
                        rid = f"ov-{kind}-{tp}-{mode}-{i}"
                        handle = receiver.reserve(rid, tp, 1, ttl_s=300)
                        conn.send(("overlap", kind, handle.to_bytes(), mode, i))
                        runs.append(reply(conn))
                        receiver.wait(rid, 60)
                        arena.free(receiver.claim(rid))
                    runs = runs[-repeats:]  # the first length's first run warms up
                    row[mode] = {key: statistics.median(r[key] for r in runs)
                                 for key in ("total_s", "prefill_s", "exposed_s")}
                whole, bg = row["whole"], row["layerwise_background"]
                row["saving_total_s"] = whole["total_s"] - bg["total_s"]
                row["saving_exposed_s"] = whole["exposed_s"] - bg["exposed_s"]
                rows[str(tp)] = row
                print(f"  overlap {kind:4s} Tp={tp:5d} " + "  ".join(
                    f"{m} {row[m]['total_s'] * 1e3:.0f} ms (exposed "
                    f"{row[m]['exposed_s'] * 1e3:.2f})" for m in OVERLAP_MODES), flush=True)
        finally:
            receiver.close()
            assert arena.bytes_in_use == 0
            arena.check_integrity()
            if isinstance(arena, ShmArena):
                arena.close()
        out[kind] = rows
    return out
