"""BackgroundStream: layer-wise sends on a worker thread, same bytes, same failures."""

from __future__ import annotations

import pytest
import torch

from pdserve.errors import InvalidArgument, TransferError
from pdserve.kvtransfer import BackgroundStream
from tests.kvtransfer import helpers
from tests.kvtransfer.conftest import Pair


def test_background_layerwise_is_bit_exact(pair: Pair) -> None:
    for i, tp in enumerate((1, 100, 513)):
        handle = pair.receiver.reserve(f"bg-{i}", tp, 4)
        kv = helpers.random_kv(pair.layout, tp, seed=i)
        stream = BackgroundStream(pair.sender.begin(handle, "layerwise"), f"bg-{i}")
        for layer in range(pair.layout.num_layers):
            stream.send_layer(layer, kv[layer])
        sent = stream.finish()
        landed = pair.receiver.wait(f"bg-{i}", 5)
        assert sent.checksum == landed.checksum is not None
        extent = pair.receiver.claim(f"bg-{i}")
        assert torch.equal(pair.layout.view(pair.arena.buffer, extent.offset, tp), kv)
        pair.arena.free(extent)


def test_background_error_surfaces_in_caller(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 17, 4)
    kv = helpers.random_kv(pair.layout, 17)
    stream = BackgroundStream(pair.sender.begin(handle, "layerwise"), "r")
    stream.send_layer(1, kv[1])  # out of order: fails on the worker
    with pytest.raises(InvalidArgument, match="in order"):
        stream.finish()
    with pytest.raises(TransferError, match="closed"):
        stream.send_layer(0, kv[0])
    with pytest.raises(TransferError, match="aborted"):
        pair.receiver.wait("r", 5)
    helpers.assert_released(pair.arena)


def test_background_cancel_mid_transfer(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 100, 4)
    kv = helpers.random_kv(pair.layout, 100)
    stream = BackgroundStream(pair.sender.begin(handle, "layerwise"), "r")
    stream.send_layer(0, kv[0])
    assert pair.receiver.cancel("r")
    with pytest.raises(TransferError):
        for layer in range(1, pair.layout.num_layers):
            stream.send_layer(layer, kv[layer])
        stream.finish()
    helpers.assert_released(pair.arena)


def test_background_abort_stops_worker(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 100, 4)
    kv = helpers.random_kv(pair.layout, 100)
    stream = BackgroundStream(pair.sender.begin(handle, "layerwise"), "r")
    stream.send_layer(0, kv[0])
    stream.abort("prefill failed")
    stream.abort("twice is fine")
    with pytest.raises(TransferError, match="sender aborted"):
        pair.receiver.wait("r", 5)
    helpers.assert_released(pair.arena)
