"""KV transfer benchmark: block-free vs block-fixed, every transport, one run.

    python -m perf.kv_transfer --json OUT.json [--plot OUT.png]

The parent process is the decode instance (arena + receiver); a spawned child
is the prefill instance (sender), as in production. For each transport,
prompt length and mode it reserves an extent, has the child send a
[L, 2, Tp, Hkv, D] KV tensor, and records the child's begin()->finish() time
(finish returns once the receiver has verified length and checksum). Medians
of ``--repeats`` transfers. Each configuration runs with the crc32 checksum
(production default) and without (``no_checksum``), to report its cost.

Limits measured in the same run, on the same bytes:
    memcpy   torch copy_ between two warmed buffers in one process
    raw_tcp  plain sendall / recv_into over loopback between the two processes,
             plus a 1-byte confirmation, timed on the sender like the transports

KV geometry: the engine's ``small`` preset (pdserve.engine.config.PRESETS),
float32. GB/s below are 1e9 bytes per second.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

import torch

from pdserve.kvtransfer import (
    Arena,
    KVHandle,
    KVLayout,
    ShmArena,
    TransferConfig,
    make_receiver,
    make_sender,
    model_fingerprint,
)

LENGTHS = (128, 512, 2048, 8192)
TRANSPORTS = ("shm", "tcp", "mooncake")
MODE_KEYS = {"whole": "block_free_s", "layerwise": "block_free_layerwise_s",
             "block_fixed": "block_fixed_s"}
REPLY_TIMEOUT_S = 120


def small_layout() -> tuple[KVLayout, str]:
    try:
        from pdserve.engine.config import PRESETS

        return PRESETS["small"].kv_layout("float32"), "pdserve.engine.config.PRESETS['small']"
    except (ImportError, KeyError):
        return KVLayout(12, 4, 64, "float32"), "fallback (12 layers, 4 KV heads, head dim 64)"


def repeats_for(nbytes: int, base: int) -> int:
    return max(3, base if nbytes < (32 << 20) else base // 2)


# -- child process: the prefill side ------------------------------------------------
def sender_main(conn: Any, layout: KVLayout, fingerprint: str, secret: bytes) -> None:
    torch.set_num_threads(1)
    senders: dict[str, Any] = {}
    kv_cache: dict[int, torch.Tensor] = {}
    try:
        while (msg := conn.recv()) is not None:
            if msg[0] == "raw_tcp":
                conn.send(raw_tcp_send(msg[1], msg[2], msg[3]))
                continue
            _, kind, handle_bytes, mode = msg
            handle = KVHandle.from_bytes(handle_bytes)
            tp = handle.prompt_tokens
            if tp not in kv_cache:  # [L, 2, Tp, Hkv, D]
                kv_cache[tp] = torch.randn(layout.num_layers, 2, tp, layout.num_kv_heads,
                                           layout.head_dim).to(layout.torch_dtype)
            if kind not in senders:
                senders[kind] = make_sender(kind, layout, fingerprint, TransferConfig(secret))
            try:
                conn.send(time_one(senders[kind], handle, kv_cache[tp], mode))
            except Exception as exc:  # reported to the parent, which stops the run
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for sender in senders.values():
            sender.close()


def time_one(sender: Any, handle: KVHandle, kv: torch.Tensor, mode: str) -> float:
    start = time.perf_counter()
    if mode == "layerwise":  # as the engine would: one call per finished layer
        with sender.begin(handle, "layerwise") as stream:
            for layer in range(kv.shape[0]):
                stream.send_layer(layer, kv[layer])
            stream.finish()
    else:
        sender.send(handle, kv, mode)
    return time.perf_counter() - start


def raw_tcp_send(port: int, nbytes: int, repeats: int) -> list[float]:
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20 or 1))[:nbytes]
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeats + 1):
            start = time.perf_counter()
            sock.sendall(payload)
            sock.recv(1)
            times.append(time.perf_counter() - start)
    return times[1:]  # the first one warms both sides up


# -- parent process: the decode side -------------------------------------------------
def reply(conn: Any) -> Any:
    if not conn.poll(REPLY_TIMEOUT_S):
        raise RuntimeError(f"sender process did not answer within {REPLY_TIMEOUT_S}s")
    answer = conn.recv()
    if isinstance(answer, tuple) and answer[0] == "error":
        raise RuntimeError(f"sender process failed: {answer[1]}")
    return answer


def measure_memcpy(nbytes: int, repeats: int) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_raw_tcp(conn: Any, nbytes: int, repeats: int) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    buf = memoryview(bytearray(nbytes))

    def serve() -> None:
        sock, _ = server.accept()
        with sock:
            for _ in range(repeats + 1):
                pos = 0
                while pos < nbytes:
                    pos += sock.recv_into(buf[pos:])
                sock.sendall(b"k")

    thread = threading.Thread(target=serve)
    thread.start()
    conn.send(("raw_tcp", server.getsockname()[1], nbytes, repeats))
    times = reply(conn)
    thread.join()
    server.close()
    return float(statistics.median(times))


def measure_transport(conn: Any, kind: str, layout: KVLayout, fingerprint: str,
                      lengths: tuple[int, ...], checksum: str, base_repeats: int,
                      secret: bytes) -> dict:
    capacity = layout.extent_bytes(max(lengths), 0) + (1 << 20)
    arena: Arena = ShmArena(capacity) if kind == "shm" else Arena(capacity)
    arena.buffer.fill_(0)  # fault the pages in before timing
    config = TransferConfig(secret, checksum=checksum)
    receiver = make_receiver(kind, arena, layout, fingerprint, config)
    out: dict[str, Any] = {}
    try:
        for tp in lengths:
            nbytes = layout.region_bytes(tp)
            row: dict[str, Any] = {"nbytes": nbytes}
            for mode, key in MODE_KEYS.items():
                times = []
                for i in range(repeats_for(nbytes, base_repeats) + 1):
                    rid = f"{kind}-{tp}-{mode}-{i}"
                    handle = receiver.reserve(rid, tp, 0, ttl_s=60)
                    conn.send(("send", kind, handle.to_bytes(), mode))
                    elapsed = reply(conn)
                    receiver.wait(rid, 30)
                    arena.free(receiver.claim(rid))
                    times.append(elapsed)
                row[key] = statistics.median(times[1:])  # the first warms up the path
            row["gbps"] = nbytes / row["block_free_s"] / 1e9
            row["gbps_layerwise"] = nbytes / row["block_free_layerwise_s"] / 1e9
            row["ratio_free_over_fixed"] = row["block_free_s"] / row["block_fixed_s"]
            row["ratio_layerwise_over_fixed"] = row["block_free_layerwise_s"] / row["block_fixed_s"]
            out[str(tp)] = row
            print(f"  {kind:8s} crc={checksum:5s} Tp={tp:5d} {nbytes / 1e6:8.1f} MB  "
                  f"free {row['block_free_s'] * 1e3:8.2f} ms  layerwise "
                  f"{row['block_free_layerwise_s'] * 1e3:8.2f} ms  fixed "
                  f"{row['block_fixed_s'] * 1e3:8.2f} ms  ratio "
                  f"{row['ratio_free_over_fixed']:.3f}  {row['gbps']:.2f} GB/s", flush=True)
    finally:
        receiver.close()
        assert arena.bytes_in_use == 0
        arena.check_integrity()
        if isinstance(arena, ShmArena):
            arena.close()
    return out


def evaluate_goals(result: dict) -> dict:
    goals: dict[str, Any] = {}
    for variant in ("checksum", "no_checksum"):
        for kind, rows in result["transports"].items():
            for tp, row in rows[variant].items():
                limits = result["limits"][tp]
                key = f"{variant}/{kind}/{tp}"
                if int(tp) >= 512:
                    goals[f"{key}/free<=0.54*fixed"] = row["ratio_free_over_fixed"] <= 0.54
                if kind == "shm":
                    goals[f"{key}/shm>=0.7*memcpy"] = row["gbps"] >= 0.7 * limits["memcpy_gbps"]
                if kind == "tcp":
                    goals[f"{key}/tcp>=0.7*raw_tcp"] = row["gbps"] >= 0.7 * limits["raw_tcp_gbps"]
    return goals


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["transports"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = result["transports"][kind]["checksum"]
        lengths = [int(t) for t in rows]
        for key, label in (("block_free_s", "block-free whole"),
                           ("block_free_layerwise_s", "block-free layer-wise"),
                           ("block_fixed_s", "block-fixed (16-token pages)")):
            ax.plot(lengths, [rows[str(t)][key] * 1e3 for t in lengths], marker="o", label=label)
        nocrc = result["transports"][kind]["no_checksum"]
        ax.plot(lengths, [nocrc[str(t)]["block_free_s"] * 1e3 for t in lengths], marker="x",
                linestyle=":", label="block-free whole, no checksum")
        limit = "memcpy_s" if kind == "shm" else "raw_tcp_s"
        ax.plot(lengths, [result["limits"][str(t)][limit] * 1e3 for t in lengths],
                linestyle="--", color="gray", label=limit.removesuffix("_s"))
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="transfer time (ms)",
               title=f"{kind}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    kinds = [k for k in args.transports.split(",") if k]
    layout, source = small_layout()
    fingerprint = model_fingerprint("bench", layout)
    torch.set_num_threads(1)  # both processes share the machine's cores
    secret = os.urandom(32)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender_main, args=(child, layout, fingerprint, secret))
    proc.start()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "geometry": {"layout": layout.__dict__, "source": source,
                     "token_bytes": layout.token_bytes},
        "units": {"*_s": "seconds, median", "gbps": "1e9 bytes/s (block-free whole)"},
        "lengths": list(lengths), "limits": {}, "transports": {},
    }
    try:
        for tp in lengths:
            nbytes = layout.region_bytes(tp)
            reps = repeats_for(nbytes, args.repeats)
            memcpy_s, raw_s = measure_memcpy(nbytes, reps), measure_raw_tcp(parent, nbytes, reps)
            result["limits"][str(tp)] = {
                "nbytes": nbytes, "memcpy_s": memcpy_s, "memcpy_gbps": nbytes / memcpy_s / 1e9,
                "raw_tcp_s": raw_s, "raw_tcp_gbps": nbytes / raw_s / 1e9}
            print(f"  limits Tp={tp:5d} memcpy {nbytes / memcpy_s / 1e9:.2f} GB/s  "
                  f"raw tcp {nbytes / raw_s / 1e9:.2f} GB/s", flush=True)
        for kind in kinds:
            result["transports"][kind] = {
                variant: measure_transport(parent, kind, layout, fingerprint, lengths,
                                           checksum, args.repeats, secret)
                for variant, checksum in (("checksum", "crc32"), ("no_checksum", "none"))}
        parent.send(None)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.perf_counter() - started
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    failed = [k for k, ok in result["goals"].items() if not ok]
    print(f"goals met: {len(result['goals']) - len(failed)}/{len(result['goals'])}; "
          f"not met: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
