"""KV transfer benchmark: block-free vs block-fixed, every transport, one run.

    python -m perf.kv_transfer --json OUT.json [--plot OUT.png] [--no-overlap]

The parent process is the decode instance (arena + receiver); a spawned child
is the prefill instance (sender), as in production. For each transport,
prompt length and mode it reserves an extent, has the child send a
[L, 2, Tp, Hkv, D] KV tensor, and records the child's begin()->finish() time
(finish returns once the receiver has verified length and checksum). Medians
of ``--repeats`` transfers. Variants per transport:
    checksum            xxh3, the production default (one-sided: verify="streaming",
                        the receiver hashes each span as its NOTE arrives)
    checksum_at_end     shm/mooncake only: xxh3, the receiver hashes the region at END
    no_checksum         to report the checksum's cost; never used in production

Limits measured in the same run, on the same bytes:
    memcpy   torch copy_ between two warmed buffers in one process
    raw_tcp  plain sendall / recv_into over loopback between the same two
             processes (receiver: a thread of the decode process, as the
             transport's), the transport's socket options (``wire.tune_socket``),
             plus a 1-byte confirmation, timed on the sender like the transports

Then (unless ``--no-overlap``) prefill + transfer end to end with the real
engine, whole-request vs layer-wise (``perf/kv_overlap.py``).

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
from collections.abc import Callable
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
    wire,
)
from perf.kv_overlap import OverlapRunner, measure_overlap

LENGTHS = (128, 512, 2048, 8192)
TRANSPORTS = ("shm", "tcp", "mooncake")
VARIANTS = {"checksum": {"checksum": "xxh3"},
            "checksum_at_end": {"checksum": "xxh3", "verify": "at_end"},
            "no_checksum": {"checksum": "none"}}
ONE_SIDED = ("shm", "mooncake")
LIMIT_OF = {"shm": "memcpy", "tcp": "raw_tcp"}  # mooncake: raw_tcp, for reference only
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
    runner: OverlapRunner | None = None
    try:
        while (msg := conn.recv()) is not None:
            if msg[0] == "raw_tcp":
                conn.send(raw_tcp_send(msg[1], msg[2], msg[3]))
                continue
            if msg[0] == "raw_open":
                raw = socket.create_connection(("127.0.0.1", msg[1]))
                wire.tune_socket(raw)
                conn.send("ok")
                continue
            if msg[0] == "raw_send":
                conn.send(raw_send_once(raw, msg[1]))
                continue
            if msg[0] == "raw_close":
                raw.close()
                conn.send("ok")
                continue
            if msg[0] == "load_engine":
                runner = OverlapRunner(msg[1])
                conn.send("loaded")
                continue
            _, kind, handle_bytes, mode = msg[:4]
            handle = KVHandle.from_bytes(handle_bytes)
            if kind not in senders:
                senders[kind] = make_sender(kind, layout, fingerprint, TransferConfig(secret))
            if msg[0] == "overlap":
                assert runner is not None
                key, lay = f"overlap-{kind}", runner.engine.layout
                if key not in senders:
                    senders[key] = make_sender(kind, lay, model_fingerprint("bench", lay),
                                               TransferConfig(secret))
                try:
                    conn.send(runner.run(senders[key], handle, mode, msg[4]))
                except Exception as exc:
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            tp = handle.prompt_tokens
            if tp not in kv_cache:  # [L, 2, Tp, Hkv, D]
                kv_cache[tp] = torch.randn(layout.num_layers, 2, tp, layout.num_kv_heads,
                                           layout.head_dim).to(layout.torch_dtype)
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


_PAYLOADS: dict[int, memoryview] = {}


def torch_bytes(nbytes: int) -> memoryview:
    """Raw-socket buffers live in torch memory, like the KV tensor and the arena (the
    allocator's alignment decides whether the kernel copies from huge pages)."""
    return wire.as_memoryview(torch.randint(0, 255, (nbytes,), dtype=torch.uint8))


def raw_payload(nbytes: int) -> memoryview:
    """Cached per size, as the transports' KV tensors are (same cache state)."""
    if nbytes not in _PAYLOADS:
        _PAYLOADS[nbytes] = torch_bytes(nbytes)
    return _PAYLOADS[nbytes]


def raw_send_once(sock: socket.socket, nbytes: int) -> float:
    payload = raw_payload(nbytes)
    start = time.perf_counter()
    sock.sendall(payload)
    sock.recv(1)
    return time.perf_counter() - start


def raw_tcp_send(port: int, nbytes: int, repeats: int) -> list[float]:
    payload = raw_payload(nbytes)
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        wire.tune_socket(sock)
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
    buf = torch_bytes(nbytes)

    def serve() -> None:
        sock, _ = server.accept()
        wire.tune_socket(sock)
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


class RawLink:
    """A persistent plain TCP connection child -> parent, like a pooled KV connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        with socket.create_server(("127.0.0.1", 0)) as server:
            conn.send(("raw_open", server.getsockname()[1]))
            self.sock, _ = server.accept()
        wire.tune_socket(self.sock)
        reply(conn)
        self.buf = memoryview(bytearray(0))

    def sample(self, nbytes: int) -> float:
        """The child's sendall + 1-byte confirmation time; received here with recv_into."""
        if self.buf.nbytes < nbytes:
            self.buf = torch_bytes(nbytes)
        self.conn.send(("raw_send", nbytes))
        pos = 0
        while pos < nbytes:
            pos += self.sock.recv_into(self.buf[pos:nbytes])
        self.sock.sendall(b"k")
        return float(reply(self.conn))

    def close(self) -> None:
        self.conn.send(("raw_close",))
        reply(self.conn)
        self.sock.close()


def limit_sampler(link: RawLink | None, limit: str, nbytes: int) -> Callable[[], float]:
    """One timed sample of the limit a transport is compared with, per call."""
    if limit == "raw_tcp":
        assert link is not None
        return lambda: link.sample(nbytes)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in

    def memcpy() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    return memcpy


def measure_transport(conn: Any, kind: str, layout: KVLayout, fingerprint: str,
                      lengths: tuple[int, ...], variant: str, base_repeats: int,
                      secret: bytes) -> dict:
    capacity = layout.extent_bytes(max(lengths), 0) + (1 << 20)
    arena: Arena = ShmArena(capacity) if kind == "shm" else Arena(capacity)
    arena.buffer.fill_(0)  # fault the pages in before timing
    config = TransferConfig(secret, **VARIANTS[variant])
    receiver = make_receiver(kind, arena, layout, fingerprint, config)
    link = RawLink(conn) if LIMIT_OF.get(kind, "raw_tcp") == "raw_tcp" else None
    out: dict[str, Any] = {}
    try:
        for tp in lengths:
            nbytes = layout.region_bytes(tp)
            row: dict[str, Any] = {"nbytes": nbytes, "limit": LIMIT_OF.get(kind, "raw_tcp")}
            sample_limit = limit_sampler(link, row["limit"], nbytes)
            times: dict[str, list[float]] = {key: [] for key in [*MODE_KEYS.values(), "limit_s"]}
            # Repeat-major, a limit sample beside every transfer: the machine's load
            # drifts over a run, so the ratio is only fair between neighbours.
            for i in range(repeats_for(nbytes, base_repeats) + 1):
                times["limit_s"].append(sample_limit())
                for mode, key in MODE_KEYS.items():
                    rid = f"{kind}-{tp}-{mode}-{i}"
                    handle = receiver.reserve(rid, tp, 0, ttl_s=60)
                    conn.send(("send", kind, handle.to_bytes(), mode))
                    elapsed = reply(conn)
                    receiver.wait(rid, 30)
                    arena.free(receiver.claim(rid))
                    times[key].append(elapsed)
            for key, values in times.items():
                row[key] = statistics.median(values[1:])  # the first warms up the path
            row["limit_gbps"] = nbytes / row["limit_s"] / 1e9
            row["of_limit"] = nbytes / row["block_free_s"] / 1e9 / row["limit_gbps"]
            row["gbps"] = nbytes / row["block_free_s"] / 1e9
            row["gbps_layerwise"] = nbytes / row["block_free_layerwise_s"] / 1e9
            row["ratio_free_over_fixed"] = row["block_free_s"] / row["block_fixed_s"]
            row["ratio_layerwise_over_fixed"] = row["block_free_layerwise_s"] / row["block_fixed_s"]
            out[str(tp)] = row
            print(f"  {kind:8s} {variant:18s} Tp={tp:5d} {nbytes / 1e6:8.1f} MB  "
                  f"free {row['block_free_s'] * 1e3:8.2f} ms  layerwise "
                  f"{row['block_free_layerwise_s'] * 1e3:8.2f} ms  fixed "
                  f"{row['block_fixed_s'] * 1e3:8.2f} ms  ratio "
                  f"{row['ratio_free_over_fixed']:.3f}  {row['gbps']:.2f} GB/s = "
                  f"{row['of_limit']:.0%} of {row['limit']} {row['limit_gbps']:.2f}", flush=True)
    finally:
        if link is not None:
            link.close()
        receiver.close()
        assert arena.bytes_in_use == 0
        arena.check_integrity()
        if isinstance(arena, ShmArena):
            arena.close()
    return out


def run_overlap(conn: Any, args: argparse.Namespace, kinds: list[str],
                secret: bytes) -> dict[str, Any]:
    from pdserve.engine.config import PRESETS

    layout = PRESETS[args.overlap_model].kv_layout("float32")
    conn.send(("load_engine", args.overlap_model))
    reply(conn)
    lengths = tuple(int(x) for x in args.overlap_lengths.split(","))
    rows = measure_overlap(conn, reply, kinds, layout, model_fingerprint("bench", layout),
                           secret, lengths, args.overlap_repeats)
    return {"model": args.overlap_model, "torch_threads": 1, "repeats": args.overlap_repeats,
            "lengths": list(lengths), "transports": rows}


def evaluate_goals(result: dict) -> dict:
    goals: dict[str, Any] = {}
    for kind, variants in result["transports"].items():
        for variant, rows in variants.items():
            for tp, row in rows.items():
                key = f"{variant}/{kind}/{tp}"
                if int(tp) >= 512:
                    goals[f"{key}/free<=0.54*fixed"] = row["ratio_free_over_fixed"] <= 0.54
                if kind in LIMIT_OF and int(tp) >= 512:  # the limit sampled beside each transfer
                    goals[f"{key}/{kind}>=0.7*{row['limit']}"] = row["of_limit"] >= 0.7
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
    parser.add_argument("--no-overlap", action="store_true",
                        help="skip the prefill + transfer section (real engine)")
    parser.add_argument("--overlap-model", default="small")
    parser.add_argument("--overlap-lengths", default="512,2048")
    parser.add_argument("--overlap-repeats", type=int, default=2)
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
                                           variant, args.repeats, secret)
                for variant in VARIANTS
                if variant != "checksum_at_end" or kind in ONE_SIDED}
        if not args.no_overlap:
            result["overlap"] = run_overlap(parent, args, [k for k in kinds if k != "mooncake"],
                                            secret)
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
