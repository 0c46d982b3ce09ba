"""Fit a profile from this project's benchmarks (``pdserve sim profile``).

Inputs: one or more ``perf/engine.py --json`` results (each gives one prefill
point, batch x length, and one decode step time per batch size at a prompt
length) and one ``perf/kv_transfer.py`` result (block-free and block-fixed
time per length, for one transport). Each linear model is fitted by least
squares with non-negative coefficients (the best subset of terms whose
unconstrained fit is non-negative): with one engine run the prefill model is
time proportional to tokens, and the decode model cannot separate batch size
from context (it then keeps batch size only). Run the engine benchmark at
several ``--prefill-len``/``--decode-prompt-len`` to fit every term.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.errors import InvalidArgument
from pdserve.scheduler.sim.profile import DecodeModel, PrefillModel, Profile, TransferModel

KV_BLOCK_TOKENS = 16  # perf/kv_transfer.py's block-fixed pages


def nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin |x b - y| over b >= 0, by trying every subset of columns (few columns)."""
    n = x.shape[1]
    best, best_err = np.zeros(n), float(np.sum(y * y))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sub = x[:, cols]
            if np.linalg.matrix_rank(sub) < k:
                continue
            coef = np.linalg.lstsq(sub, y, rcond=None)[0]
            if np.any(coef < 0):
                continue
            err = float(np.sum((sub @ coef - y) ** 2))
            if err < best_err - 1e-18:
                best, best_err = np.zeros(n), err
                best[list(cols)] = coef
    return best


def _load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read benchmark result {p}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{p}: expected a JSON object")
    return doc


def fit_prefill(engines: list[dict[str, Any]]) -> PrefillModel:
    rows, times = [], []
    for e in engines:
        b, t = int(e["prefill_batch"]), int(e["prefill_len"])
        rows.append([1.0, b * t, b * t * t])
        times.append(b * t / float(e["prefill_tok_s"]))
    c = nonneg_lstsq(np.array(rows), np.array(times))
    return PrefillModel(fixed_s=float(c[0]), per_token_s=float(c[1]), per_token2_s=float(c[2]),
                        max_batch_size=int(engines[0]["prefill_batch"]))


def fit_decode(engines: list[dict[str, Any]], kv_capacity_tokens: int) -> DecodeModel:
    rows, times = [], []
    for e in engines:
        ctx_per_seq = int(e["decode_prompt_len"]) + int(e["decode_steps"]) / 2
        for b, ms in e["decode_step_ms"].items():
            rows.append([1.0, int(b), int(b) * ctx_per_seq])
            times.append(float(ms) / 1000.0)
    c = nonneg_lstsq(np.array(rows), np.array(times))
    max_b = max(int(b) for e in engines for b in e["decode_step_ms"])
    return DecodeModel(fixed_s=float(c[0]), per_seq_s=float(c[1]), per_ctx_token_s=float(c[2]),
                       max_batch_size=max_b, kv_capacity_tokens=kv_capacity_tokens)


def fit_transfer(kv: dict[str, Any], transport: str) -> tuple[dict[str, TransferModel], int]:
    try:
        token_bytes = int(kv["geometry"]["token_bytes"])
        runs = kv["transports"][transport]["no_checksum"]
    except KeyError as exc:
        raise InvalidArgument(f"kv_transfer result lacks {exc} (transport {transport!r})") from exc
    lengths = sorted(int(n) for n in runs)
    nbytes = np.array([float(runs[str(n)]["nbytes"]) for n in lengths])
    free = np.array([float(runs[str(n)]["block_free_s"]) for n in lengths])
    fixed = np.array([float(runs[str(n)]["block_fixed_s"]) for n in lengths])
    x = np.stack([np.ones_like(nbytes), nbytes], axis=1)
    a, inv_bw = nonneg_lstsq(x, free)
    blocks = np.array([-(-n // KV_BLOCK_TOKENS) for n in lengths], dtype=float)
    per_block = float(nonneg_lstsq(blocks[:, None], np.maximum(fixed - free, 0.0))[0])
    bw = float(1.0 / inv_bw) if inv_bw > 0 else 1e12
    free_m = TransferModel(latency_s=float(a), bytes_per_s=bw)
    fixed_m = TransferModel(latency_s=float(a), bytes_per_s=bw, per_block_s=per_block,
                            block_tokens=KV_BLOCK_TOKENS)
    return {"block_free": free_m, "block_fixed": fixed_m}, token_bytes


def fit_profile(engine_paths: list[str], kv_path: str, transport: str = "shm",
                name: str = "fitted", kv_capacity_tokens: int = 65536) -> Profile:
    if not engine_paths:
        raise InvalidArgument("need at least one perf/engine.py result (--engine)")
    engines = [_load(p) for p in engine_paths]
    kv = _load(kv_path)
    try:
        prefill = fit_prefill(engines)
        decode = fit_decode(engines, kv_capacity_tokens)
    except (KeyError, ValueError) as exc:
        raise InvalidArgument(f"engine result lacks a field or has a bad value: {exc}") from exc
    transfer, token_bytes = fit_transfer(kv, transport)
    layers = int(kv["geometry"]["layout"]["num_layers"])
    return Profile(
        name=name,
        source=f"fitted by pdserve sim profile from {', '.join(engine_paths)} and {kv_path} "
               f"(transport {transport}) on this machine",
        kv_bytes_per_token=token_bytes,
        prefill=prefill,
        decode=decode,
        transfer=transfer,
        num_layers=layers,
        notes={"engine_preset": str(engines[0].get("preset")),
               "machine": str(engines[0].get("machine", {}).get("cpu"))},
    )
