"""Shared pieces of the simulator experiments (perf/sim_*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.workload import LengthDistribution
from pdserve.scheduler.ratio import RoleCapacity, balanced_split
from pdserve.scheduler.sim.profile import Profile, load_profile
from pdserve.scheduler.sim.results import Outcomes

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "perf" / "sim_profiles" / "h100_llama3_8b.yaml"
OUT = ROOT / "perf" / "out"


def h100() -> Profile:
    return load_profile(H100)


def lengths(mean: float, std: float, lo: int = 1, hi: int | None = None) -> LengthDistribution:
    return LengthDistribution(mean, std, lo, hi)


def capacities(p: Profile, mean_in: float, mean_out: float) -> tuple[RoleCapacity, RoleCapacity]:
    """Per-instance (prefill, decode) capacity for a length mix, from the profile alone.

    Prefill: one prompt at a time (batches are token-bound, so about linear);
    decode: the largest batch that fits KV, each sequence taking mean_out steps.
    """
    pre = RoleCapacity(1.0, p.prefill.prompt_time(int(mean_in)))
    b = max(1, min(p.decode.max_batch_size,
                   int(p.decode.kv_capacity_tokens // (mean_in + mean_out))))
    step = p.decode.step_time(b, b * (mean_in + mean_out / 2))
    return pre, RoleCapacity(float(b), mean_out * step)


def split(p: Profile, n: int, mean_in: float, mean_out: float) -> tuple[int, int]:
    return balanced_split(n, *capacities(p, mean_in, mean_out))


def capacity_rps(p: Profile, n: int, mean_in: float, mean_out: float) -> float:
    pre, dec = capacities(p, mean_in, mean_out)
    n_p, n_d = split(p, n, mean_in, mean_out)
    return min(n_p * pre.requests_per_s, n_d * dec.requests_per_s)


def binned(o: Outcomes, bin_s: float, ttft_ms: float, tpot_ms: float | None,
           until: float) -> dict[str, list[float]]:
    """Per time bin (by arrival): requests, SLO attainment, errors."""
    send = np.asarray(o.send)
    first, last, tok = np.asarray(o.first), np.asarray(o.last), np.asarray(o.tokens)
    ok = np.array([k == "" for k in o.kind])
    good = ok & ((first - send) * 1000 <= ttft_ms)
    if tpot_ms is not None:
        itl = np.where(tok >= 2, (last - first) / np.maximum(tok - 1, 1), 0) * 1000
        good &= itl <= tpot_ms
    edges = np.arange(0.0, until + bin_s, bin_s)
    idx = np.digitize(send, edges) - 1
    n = np.bincount(idx, minlength=len(edges))[: len(edges) - 1]
    g = np.bincount(idx, weights=good, minlength=len(edges))[: len(edges) - 1]
    e = np.bincount(idx, weights=~ok, minlength=len(edges))[: len(edges) - 1]
    return {"t": list(edges[:-1]), "requests": n.tolist(),
            "attainment": [float(a / b) if b else float("nan") for a, b in zip(g, n, strict=True)],
            "errors": e.tolist()}


def save(name: str, doc: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path
