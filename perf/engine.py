"""Engine throughput vs Hugging Face transformers, and vs the machine's limits.

    python -m perf.engine --preset small --json OUT

Measured in one process on the same thread count, each workload alternating
pdserve and HF runs (so both see the same background load):

- prefill: batches of ``--prefill-batch`` prompts of ``--prefill-len`` tokens.
  pdserve packs them into one forward; HF runs model(ids) on [B, T] (equal
  lengths, so no padding) keeping only the last logits. Best of the repeats.
- decode at each batch size: ``--decode-steps`` timed steps after a
  ``--decode-prompt-len``-token prefill and one warm-up step, per repeat; the
  figure is the MEDIAN step time over all repeats (``best_step`` holds the
  same figures from the fastest step, the least disturbed by other jobs). HF steps are timed inside
  generate (with its DynamicCache) by a StoppingCriteria that only records a
  timestamp per step; EOS is disabled on both sides.
- limits: matmul peak = best FLOP/s of a square fp32 GEMM (``--gemm-n``);
  memcpy bandwidth = (bytes read + bytes written) / time of a large tensor
  ``copy_`` (so one byte moved counts twice, as STREAM "copy" does).
- prefill_mfu = model FLOPs / time / matmul peak, where model FLOPs =
  2 * matmul params * tokens + causal attention 2 * 2 * H * D * T(T+1)/2 per
  sequence and layer (QK^T and PV, only the unmasked half counted).
- decode_bw_util[b] = weight bytes read per step / step time / memcpy bw
  (weights only: KV reads excluded, which flatters large batches a little).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pdserve.engine import LLMEngine, ModelConfig, SamplingParams
from pdserve.engine.weights import random_state_dict


def _best(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return 2 * n**3 / _best(lambda: _timed(lambda: a @ b), repeats)


def memcpy_bandwidth(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / _best(lambda: _timed(lambda: dst.copy_(src)), repeats)


def hf_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """The preset's exact weights in a transformers LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_context,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.attention_bias,
        bos_token_id=config.bos_token_id, eos_token_id=None, pad_token_id=0,
    )
    model: Any = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(state, strict=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g).tolist()


def bench_prefill(engine: LLMEngine, hf: Any, batch: int, length: int, repeats: int
                  ) -> tuple[float, float]:
    ids = prompts(batch, length, seed=1)
    params = SamplingParams(max_tokens=1)

    def ours() -> float:
        seqs = [engine.new_sequence(f"p{i}", p, params) for i, p in enumerate(ids)]
        try:
            return _timed(lambda: engine.prefill(seqs))
        finally:
            for s in seqs:
                engine.release(s)

    x = torch.tensor(ids)

    def theirs() -> float:
        with torch.inference_mode():
            return _timed(lambda: hf(x, use_cache=False, logits_to_keep=1))

    t_ours, t_hf = [], []
    for _ in range(repeats):  # alternate so both see the same background load
        t_ours.append(ours())
        t_hf.append(theirs())
    return min(t_ours), min(t_hf)


class _StepClock:
    """A transformers StoppingCriteria that only timestamps each decode step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def bench_decode(engine: LLMEngine, hf: Any, batch: int, prompt_len: int, steps: int,
                 repeats: int) -> tuple[list[float], list[float]]:
    """Per-step decode times (seconds) of pdserve and of HF generate."""
    from transformers import StoppingCriteriaList

    ids = prompts(batch, prompt_len, seed=2)
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)

    def ours() -> list[float]:
        seqs = [engine.new_sequence(f"d{i}", p, params) for i, p in enumerate(ids)]
        try:
            engine.prefill(seqs)
            engine.decode_step(seqs)  # warm-up step
            return [_timed(lambda: engine.decode_step(seqs)) for _ in range(steps)]
        finally:
            for s in seqs:
                engine.release(s)

    x = torch.tensor(ids)

    def theirs() -> list[float]:
        clock = _StepClock()
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=steps + 2, min_new_tokens=steps + 2, do_sample=False,
                        stopping_criteria=StoppingCriteriaList([clock]))
        # stamps[0] ends the prefill; stamps[1] the warm-up step; then `steps` steps.
        return [b - a for a, b in itertools.pairwise(clock.stamps[1:])]

    t_ours: list[float] = []
    t_hf: list[float] = []
    for _ in range(repeats):
        t_ours += ours()
        t_hf += theirs()
    return t_ours, t_hf


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    engine = LLMEngine.load(args.preset, dtype=args.dtype)
    hf = hf_model(engine.config, random_state_dict(engine.config, 0), engine.model.dtype)
    c = engine.config
    peak = matmul_peak(args.gemm_n, args.repeats + 2)
    bw = memcpy_bandwidth(args.memcpy_mb << 20, args.repeats + 2)

    t_pf, t_pf_hf = bench_prefill(engine, hf, args.prefill_batch, args.prefill_len, args.repeats)
    tokens = args.prefill_batch * args.prefill_len
    attn_flops = 2 * 2 * c.num_heads * c.head_dim * args.prefill_len * (args.prefill_len + 1) / 2
    flops = 2 * c.num_matmul_params * tokens + attn_flops * c.num_layers * args.prefill_batch

    decode, decode_hf, bw_util, step_ms, hf_step_ms = {}, {}, {}, {}, {}
    best: dict[str, dict[str, float]] = {"decode_tok_s": {}, "hf_decode_tok_s": {},
                                         "decode_bw_util": {}}
    for b in args.decode_batches:
        steps, steps_hf = bench_decode(engine, hf, b, args.decode_prompt_len, args.decode_steps,
                                       args.repeats)
        # Median step: robust to bursts from other jobs on the shared cores.
        t, t_hf = statistics.median(steps), statistics.median(steps_hf)
        decode[str(b)] = b / t
        decode_hf[str(b)] = b / t_hf
        step_ms[str(b)] = 1e3 * t
        hf_step_ms[str(b)] = 1e3 * t_hf
        bw_util[str(b)] = engine.model.weight_bytes / t / bw
        # Fastest step: the least disturbed one when other jobs share the cores.
        best["decode_tok_s"][str(b)] = b / min(steps)
        best["hf_decode_tok_s"][str(b)] = b / min(steps_hf)
        best["decode_bw_util"][str(b)] = engine.model.weight_bytes / min(steps) / bw
    assert engine.arena.bytes_in_use == 0
    return {
        "preset": args.preset, "dtype": args.dtype, "params": c.num_params,
        "weight_bytes": engine.model.weight_bytes,
        "prefill_batch": args.prefill_batch, "prefill_len": args.prefill_len,
        "prefill_tok_s": tokens / t_pf, "hf_prefill_tok_s": tokens / t_pf_hf,
        "prefill_flops_per_s": flops / t_pf, "prefill_mfu": flops / t_pf / peak,
        "decode_prompt_len": args.decode_prompt_len, "decode_steps": args.decode_steps,
        "decode_tok_s": decode, "hf_decode_tok_s": decode_hf,
        "decode_step_ms": step_ms, "hf_decode_step_ms": hf_step_ms,
        "decode_bw_util": bw_util,
        "decode_speedup_vs_hf": {b: decode[b] / decode_hf[b] for b in decode},
        "best_step": best,
        "matmul_peak_flops": peak, "memcpy_bytes_per_s": bw,
        "flops_definition": "2*matmul_params*tokens + causal attention (QK^T, PV)",
        "memcpy_definition": "(bytes read + bytes written) / time of tensor.copy_",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8, 32])
    p.add_argument("--decode-prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--memcpy-mb", type=int, default=256)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
