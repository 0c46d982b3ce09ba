"""Bit-exact round trips: every transport x mode x prompt length x dtype."""

from __future__ import annotations

import threading

import pytest
import torch

from pdserve.kvtransfer import MODES, KVHandle, KVLayout
from tests.kvtransfer import helpers
from tests.kvtransfer.conftest import TRANSPORTS, Pair, close_pair, open_pair


def transfer(pair: Pair, request_id: str, kv: torch.Tensor, mode: str,
             max_new_tokens: int = 8) -> None:
    tp = kv.shape[2]
    handle = pair.receiver.reserve(request_id, tp, max_new_tokens, ttl_s=10)
    handle = KVHandle.from_bytes(handle.to_bytes())  # what crosses the router
    if mode == "layerwise":
        with pair.sender.begin(handle, "layerwise") as stream:
            for layer in range(pair.layout.num_layers):
                stream.send_layer(layer, kv[layer])
            sent = stream.finish()
    else:
        sent = pair.sender.send(handle, kv, mode)
    landed = pair.receiver.wait(request_id, timeout_s=5)
    assert landed.nbytes == sent.nbytes == pair.layout.region_bytes(tp)
    assert landed.checksum == sent.checksum is not None
    extent = pair.receiver.claim(request_id)
    got = pair.layout.view(pair.arena.buffer, extent.offset, tp)  # [L, 2, Tp, Hkv, D]
    assert torch.equal(got, kv), f"{pair.kind}/{mode}/{tp}: KV differs after transfer"
    pair.arena.free(extent)  # the decode engine's job once the sequence ends


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("mode", MODES)
def test_bit_exact_every_length_and_dtype(kind: str, mode: str) -> None:
    for dtype in ("float32", "bfloat16"):
        layout = KVLayout(3, 2, 16, dtype)
        pair = open_pair(kind, layout)
        try:
            for i, tp in enumerate(helpers.PROMPT_LENGTHS):
                transfer(pair, f"{mode}-{dtype}-{tp}", helpers.random_kv(layout, tp, seed=i), mode)
            if mode == "block_fixed":
                handle = pair.receiver.reserve("pages", 33, 0)
                result = pair.sender.send(handle, helpers.random_kv(layout, 33), "block_fixed")
                assert result.num_messages == 3 * 2 * 3  # L * (K,V) * ceil(33/16)
                pair.receiver.wait("pages", 5)
                pair.arena.free(pair.receiver.claim("pages"))
        finally:
            close_pair(pair)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_concurrent_transfers_into_one_arena(kind: str) -> None:
    pair = open_pair(kind, capacity=16 << 20)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for j, mode in enumerate(MODES):
                tp = (17, 100, 513)[(index + j) % 3]
                kv = helpers.random_kv(pair.layout, tp, seed=index * 10 + j)
                transfer(pair, f"t{index}-{mode}", kv, mode)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert pair.sender.num_idle_connections >= 1  # connections were pooled, not leaked
    finally:
        close_pair(pair)


def test_stream_reuses_pooled_connection(pair: Pair) -> None:
    for i in range(5):
        transfer(pair, f"seq-{i}", helpers.random_kv(pair.layout, 16, seed=i), "whole")
    assert pair.sender.num_idle_connections == 1
    assert pair.receiver.num_connections == 1
