"""Shared helpers for the kvtransfer tests (also imported by spawned children)."""

from __future__ import annotations

import os
import threading
import time

import torch

from pdserve.kvtransfer import Arena, KVLayout, ShmArena, TransferConfig, model_fingerprint

SECRET = b"test-secret-0123456789abcdef"
LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32")
PROMPT_LENGTHS = (1, 15, 16, 17, 100, 513)


def config(**overrides: object) -> TransferConfig:
    base: dict[str, object] = {"secret": SECRET, "io_timeout_s": 3.0, "connect_timeout_s": 2.0}
    base.update(overrides)
    return TransferConfig(**base)


def fingerprint(layout: KVLayout = LAYOUT, model: str = "test-model") -> str:
    return model_fingerprint(model, layout)


def make_arena(kind: str, capacity: int = 8 << 20) -> Arena:
    return ShmArena(capacity) if kind == "shm" else Arena(capacity)


def random_kv(layout: KVLayout, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # [L, 2, Tp, Hkv, D]
    kv = torch.randn(layout.num_layers, 2, prompt_tokens, layout.num_kv_heads, layout.head_dim,
                     generator=gen)
    return kv.to(layout.torch_dtype)


def mooncake_available() -> bool:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError:
        return False
    return True


def kv_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kv-")
            or t.name.endswith("-ttl-reaper")]


def own_shm_segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"pdkv-{os.getpid()}-")]


def wait_until(predicate: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def assert_released(arena: Arena) -> None:
    """The arena is fully free again and its bookkeeping is sound."""
    assert wait_until(lambda: arena.bytes_in_use == 0), f"{arena.bytes_in_use} bytes leaked"
    arena.check_integrity()


def child_sender(kind: str, conn: object, die_after_layers: int | None = None) -> None:
    """Spawned prefill process: receive handle bytes, send deterministic KV, report back.

    With ``die_after_layers`` it sends that many layers layer-wise, says so,
    and waits to be killed mid-transfer.
    """
    from pdserve.kvtransfer import KVHandle, make_sender

    sender = make_sender(kind, LAYOUT, fingerprint(), config())
    try:
        while True:
            msg = conn.recv()  # type: ignore[attr-defined]
            if msg is None:
                break
            handle_bytes, mode, seed = msg
            handle = KVHandle.from_bytes(handle_bytes)
            kv = random_kv(LAYOUT, handle.prompt_tokens, seed)
            if die_after_layers is not None:
                stream = sender.begin(handle, "layerwise")
                for layer in range(die_after_layers):
                    stream.send_layer(layer, kv[layer])
                conn.send("half-sent")  # type: ignore[attr-defined]
                time.sleep(60)  # killed here
            result = sender.send(handle, kv, mode)
            conn.send(("ok", result.nbytes))  # type: ignore[attr-defined]
    finally:
        sender.close()
