from __future__ import annotations

import json

import pytest

from pdserve.errors import InvalidArgument
from pdserve.kvtransfer import KVHandle, TransferConfig

BASE = dict(
    request_id="req-1", instance="decode_0", transport="tcp", endpoint="127.0.0.1:9000",
    extent_offset=128, extent_nbytes=1 << 20, prompt_tokens=17, max_new_tokens=32,
    num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", model_fingerprint="fp",
)


def test_round_trip_is_exact() -> None:
    handle = KVHandle(**BASE)
    again = KVHandle.from_bytes(handle.to_bytes())
    assert again == handle
    assert again.prompt_nbytes == 2 * 2 * 17 * 2 * 8 * 2
    assert len(handle.to_bytes()) < 1024


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "JSON object"),
    (json.dumps({**BASE, "version": 99}).encode(), "version"),
    (json.dumps({**BASE, "version": 1, "extra": 1}).encode(), "unknown fields"),
    (json.dumps({**BASE, "version": 1, "prompt_tokens": "17"}).encode(), "prompt_tokens"),
    (json.dumps({k: v for k, v in {**BASE, "version": 1}.items() if k != "endpoint"}).encode(),
     "incomplete"),
    (json.dumps({**BASE, "version": 1, "transport": "carrier-pigeon"}).encode(), "transport"),
    (json.dumps({**BASE, "version": 1, "extent_nbytes": 64}).encode(), "cannot hold"),
    (json.dumps({**BASE, "version": 1, "request_id": "a b"}).encode(), "request_id"),
    (b"x" * 10000, "exceeds"),
])
def test_bad_bytes_raise_clear_errors(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        KVHandle.from_bytes(data)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="secret"):
        TransferConfig(secret=b"short")
    with pytest.raises(ValueError, match="wildcard"):
        TransferConfig(secret=b"s" * 16, host="0.0.0.0")
    assert TransferConfig(secret=b"s" * 16, host="0.0.0.0", advertise_host="10.0.0.2").public_host \
        == "10.0.0.2"
    with pytest.raises(ValueError, match="checksum"):
        TransferConfig(secret=b"s" * 16, checksum="md5")
