"""pdserve's engine and KV copies measured on a GPU, for the simulator's device profiles.

    python -m perf.gpu_profile --out DIR [--device cuda:0] [--geometry llama3-8b]

Everything runs in one process on one GPU and is timed with the device
synchronised before and after (so launch overheads count, as they do when
serving). Files written in DIR, in the shapes ``pdserve sim profile`` reads:

- ``engine_<i>.json``: perf/engine.py's fields (``prefill_batch``,
  ``prefill_len``, ``prefill_tok_s``, ``decode_prompt_len``, ``decode_steps``,
  ``decode_step_ms``), one file per (prefill length, decode context) pair, from
  pdserve's own engine (LLMEngine: eager PyTorch, decode attention batched
  by one gather a layer, engine/decode_batch.py) with random weights of the
  chosen geometry. Median decode step over all timed
  steps; best of the prefill repeats. ``decode_step_ms_per_sequence_attention``:
  the same steps with attention one sequence at a time (the engine's path
  before the batched gather), for the ratio (``--no-per-sequence`` skips it).
- ``kv_d2d.json``: perf/kv_transfer.py's shape under transport ``cuda_d2d``:
  one request's KV ([L, 2, T, Hkv, D], as the prefill's arena holds it) copied
  device-to-device into another arena on the same GPU, median of the repeats:
    block_free_s            one copy of the whole region
    block_free_layerwise_s  one copy per layer (L copies)
    block_fixed_s           one copy per 16-token page of K or V of one layer
                            (L * 2 * ceil(T / 16)) into a paged pool at
                            shuffled page slots, enqueued back to back
    block_fixed_acked_s     the same, waiting for each page before the next (the
                            per-page confirmation the CPU transports' block-fixed
                            mode waits for)
  This is the copy engine's side of a transfer on ONE device; a transfer
  between two GPUs adds the link (NVLink, RDMA), which this does not measure.
- ``check.json``: greedy tokens of the ``tiny`` and ``small`` presets (float32)
  on the GPU against the CPU, and the device's bf16 matmul and copy limits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pdserve.engine import LLMEngine, ModelConfig, SamplingParams, generate
from pdserve.engine.config import PRESETS
from pdserve.engine.tokenizer_loader import load_tokenizer_and_config
from pdserve.engine.weights import random_state_dict
from pdserve.kvtransfer.arena import Arena
from pdserve.kvtransfer.layout import torch_dtype

PAGE_TOKENS = 16  # perf/kv_transfer.py's block-fixed pages

# Llama-3-8B's shape (random weights: the timings depend on shapes, not values).
GEOMETRIES: dict[str, ModelConfig] = {
    "llama3-8b": replace(PRESETS["small"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, rope_theta=500000.0, max_context=8192),
    "small": PRESETS["small"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def build_engine(geometry: str, device: torch.device, dtype: str,
                 kv_bytes: int) -> LLMEngine:
    tokenizer, _ = load_tokenizer_and_config("small")
    config = GEOMETRIES[geometry]
    state = random_state_dict(config, 0, device=device, dtype=torch_dtype(dtype))
    arena = Arena(buffer=torch.empty(kv_bytes, dtype=torch.uint8, device=device))
    return LLMEngine(config, state, tokenizer, dtype=dtype, device=device, arena=arena)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g).tolist()


def bench_prefill(engine: LLMEngine, batch: int, length: int, repeats: int) -> float:
    ids = _prompts(batch, length, seed=1)
    params = SamplingParams(max_tokens=1)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        seqs = [engine.new_sequence(f"p{i}", p, params) for i, p in enumerate(ids)]
        try:
            times.append(timed(engine.device, functools.partial(engine.prefill, seqs)))
        finally:
            for s in seqs:
                engine.release(s)
    return min(times[1:])


def bench_decode(engine: LLMEngine, batch: int, prompt_len: int, steps: int, repeats: int,
                 prefill_group: int = 8) -> list[float]:
    ids = _prompts(batch, prompt_len, seed=2)
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    out: list[float] = []
    for _ in range(repeats):
        seqs = [engine.new_sequence(f"d{i}", p, params) for i, p in enumerate(ids)]
        try:
            for i in range(0, batch, prefill_group):  # bounded activations
                engine.prefill(seqs[i:i + prefill_group])
            engine.decode_step(seqs)  # warm-up
            step = functools.partial(engine.decode_step, seqs)
            out += [timed(engine.device, step) for _ in range(steps)]
        finally:
            for s in seqs:
                engine.release(s)
    return out


def kv_copies(device: torch.device, dtype: torch.dtype, layers: int, kv_heads: int,
              head_dim: int, tokens: int, repeats: int) -> dict[str, float]:
    """One request's KV moved device-to-device four ways (see the module doc)."""
    src = torch.randn(layers, 2, tokens, kv_heads, head_dim, device=device).to(dtype)
    dst = torch.empty_like(src)
    pages = -(-tokens // PAGE_TOKENS)
    pool = torch.empty(layers * 2 * pages, PAGE_TOKENS, kv_heads, head_dim, device=device,
                       dtype=dtype)
    slots = list(range(pool.shape[0]))
    random.Random(0).shuffle(slots)
    page_views = []
    for layer in range(layers):
        for kv in range(2):
            for p in range(pages):
                n = min(PAGE_TOKENS, tokens - p * PAGE_TOKENS)
                slot = slots[(layer * 2 + kv) * pages + p]
                page_views.append((pool[slot, :n], src[layer, kv, p * PAGE_TOKENS:][:n]))

    def whole() -> None:
        dst.copy_(src)

    def layerwise() -> None:
        for layer in range(layers):
            dst[layer].copy_(src[layer])

    def fixed() -> None:
        for d, s in page_views:
            d.copy_(s)

    def fixed_acked() -> None:
        for d, s in page_views:
            d.copy_(s)
            _sync(device)

    result: dict[str, float] = {"nbytes": src.numel() * src.element_size(),
                                "pages": len(page_views)}
    for key, fn in (("block_free_s", whole), ("block_free_layerwise_s", layerwise),
                    ("block_fixed_s", fixed), ("block_fixed_acked_s", fixed_acked)):
        fn()  # warm-up
        result[key] = statistics.median(timed(device, fn) for _ in range(repeats))
    # What each way moved is what the next stage would read.
    if not torch.equal(dst, src) or not all(torch.equal(d, s) for d, s in page_views):
        raise AssertionError("a KV copy did not move the request's bytes")
    return result


def device_limits(device: torch.device, n: int = 8192, copy_mb: int = 1024) -> dict[str, Any]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    mm = min(timed(device, lambda: a @ b) for _ in range(5))
    x = torch.empty(copy_mb << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    cp = min(timed(device, lambda: y.copy_(x)) for _ in range(5))
    return {"bf16_matmul_flops": 2 * n**3 / mm,
            "copy_bytes_per_s": 2 * x.numel() / cp,
            "copy_definition": "(bytes read + bytes written) / time of tensor.copy_"}


def check_tokens(device: torch.device, presets: tuple[str, ...] = ("tiny", "small")
                 ) -> dict[str, Any]:
    """Greedy tokens on the device vs the CPU, same weights (float32)."""
    out: dict[str, Any] = {}
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for preset in presets:
        prompts = [[7 + 3 * i + j for j in range(5 + 7 * i)] for i in range(8)]
        cpu = generate(LLMEngine.load(preset, device="cpu"), prompts, params)
        dev = generate(LLMEngine.load(preset, device=str(device)), prompts, params)
        same = sum(a == b for x, y in zip(cpu, dev, strict=True) for a, b in zip(x, y,
                                                                                   strict=True))
        first_diff = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                      for x, y in zip(cpu, dev, strict=True)]
        out[preset] = {"tokens": sum(map(len, cpu)), "same": same,
                       "identical_sequences": sum(d is None for d in first_diff),
                       "first_difference_at": first_diff}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    machine = {"device": name, "torch": torch.__version__,
               "cuda": getattr(torch.version, "cuda", None)}
    t_start = time.perf_counter()
    summary: dict[str, Any] = {"machine": machine, "geometry": args.geometry,
                               "dtype": args.dtype}
    if not args.skip_check:
        summary["check"] = check_tokens(device)
        summary["limits"] = device_limits(device) if device.type == "cuda" else {}
        (args.out / "check.json").write_text(json.dumps(summary, indent=2))
        print("check", json.dumps(summary["check"]), flush=True)

    config = GEOMETRIES[args.geometry]
    dt_ = torch_dtype(args.dtype)
    kv_rows: dict[str, Any] = {}
    for t in args.kv_lengths:
        kv_rows[str(t)] = kv_copies(device, dt_, config.num_layers, config.num_kv_heads,
                                    config.head_dim, t, args.repeats + 3)
        print(f"kv {t}: {kv_rows[str(t)]}", flush=True)
    layout = config.kv_layout(args.dtype)
    token_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim \
        * torch.empty(0, dtype=dt_).element_size()
    kv_doc = {"geometry": {"token_bytes": token_bytes,
                           "layout": {"num_layers": layout.num_layers,
                                      "num_kv_heads": layout.num_kv_heads,
                                      "head_dim": layout.head_dim, "dtype": args.dtype}},
              "transports": {"cuda_d2d": {"no_checksum": kv_rows}},
              "machine": machine, "page_tokens": PAGE_TOKENS,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (args.out / "kv_d2d.json").write_text(json.dumps(kv_doc, indent=2))

    max_ctx = max(args.decode_prompt_lens) + args.decode_steps + 2
    kv_bytes = max(args.decode_batches) * max_ctx * token_bytes * 9 // 8
    kv_bytes = max(kv_bytes, max(args.prefill_lens) * args.prefill_batch * token_bytes * 2)
    engine = build_engine(args.geometry, device, args.dtype, kv_bytes)
    summary["engines"] = []
    for i, (plen, dlen) in enumerate(zip(args.prefill_lens, args.decode_prompt_lens,
                                         strict=True)):
        t_pf = bench_prefill(engine, args.prefill_batch, plen, args.repeats)
        step_ms, best_ms, per_seq_ms = {}, {}, {}
        for b in args.decode_batches:
            steps = bench_decode(engine, b, dlen, args.decode_steps, args.repeats)
            step_ms[str(b)] = 1e3 * statistics.median(steps)
            best_ms[str(b)] = 1e3 * min(steps)
            if args.per_sequence and b > 1:
                # The same steps with attention run one sequence at a time
                # (the engine's path before the batched gather): their ratio.
                engine.model.decode_batching = "never"
                try:
                    slow = bench_decode(engine, b, dlen, args.decode_steps, args.repeats)
                finally:
                    engine.model.decode_batching = "auto"
                per_seq_ms[str(b)] = 1e3 * statistics.median(slow)
        doc = {"preset": f"{args.geometry} (random weights)", "dtype": args.dtype,
               "params": config.num_params, "weight_bytes": engine.model.weight_bytes,
               "prefill_batch": args.prefill_batch, "prefill_len": plen,
               "prefill_tok_s": args.prefill_batch * plen / t_pf,
               "prefill_s": t_pf,
               "decode_prompt_len": dlen, "decode_steps": args.decode_steps,
               "decode_step_ms": step_ms, "best_step_ms": best_ms,
               "decode_step_ms_per_sequence_attention": per_seq_ms,
               "decode_tok_s": {b: int(b) / (ms / 1e3) for b, ms in step_ms.items()},
               "machine": {"cpu": name, **machine},
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        (args.out / f"engine_{i}.json").write_text(json.dumps(doc, indent=2))
        summary["engines"].append({k: doc[k] for k in ("prefill_len", "prefill_s",
                                                       "decode_prompt_len", "decode_step_ms")})
        print(f"engine prefill {plen}: {t_pf * 1e3:.1f} ms; decode at {dlen}: {step_ms} "
              f"(attention per sequence: {per_seq_ms})", flush=True)
    assert engine.arena.bytes_in_use == 0
    summary["seconds"] = time.perf_counter() - t_start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--geometry", default="llama3-8b", choices=sorted(GEOMETRIES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-lens", type=_ints, default=[256, 1024, 4096])
    p.add_argument("--decode-prompt-lens", type=_ints, default=[256, 1024, 2048])
    p.add_argument("--decode-batches", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--decode-steps", type=int, default=6)
    p.add_argument("--kv-lengths", type=_ints, default=[128, 512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--no-per-sequence", dest="per_sequence", action="store_false",
                   help="skip the decode steps with attention one sequence at a time")
    args = p.parse_args(argv)
    if len(args.prefill_lens) != len(args.decode_prompt_lens):
        p.error("--prefill-lens and --decode-prompt-lens pair up: give as many of each")
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
