"""Building an instance's pieces from its config (no Triton import).

Thread pinning, engine loading and KV transfer endpoints, shared by the
prefill, decode and aggregated roles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.kvtransfer.arena import Arena
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.shm import ShmArena
from pdserve.roles.cpu_quota import CpuQuota
from pdserve.server.config import InstanceConfig

log = logging.getLogger(__name__)


def reserves_cpu(role: str) -> bool:
    """Whether an instance in ``role`` with a CPU quota is given it first
    (``CpuQuota.reserve``): decode steps are the tokens' latency (TPOT), and a
    step preempted by the router or Triton stretches every stream in the batch.
    A prefill's quota is not reserved: where the router shares its cores, a
    reserved prefill crowds out the router that feeds it (measured in
    ``roles/cpu_quota.py``)."""
    return role in ("decode", "aggregated")


def apply_pinning(cfg: InstanceConfig) -> CpuQuota | None:
    """Pin this stub to ``cpu_cores`` (if set), limit it to ``cpu_quota`` cores (if
    set: the returned handle releases the limit; reserved per ``reserves_cpu``) and
    size torch's thread pool."""
    if cfg.cpu_cores is not None:
        usable = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
        missing = sorted(set(cfg.cpu_cores) - usable)
        if missing:
            raise ValueError(f"{cfg.name}: cpu_cores {missing} do not exist on this machine")
        os.sched_setaffinity(0, cfg.cpu_cores)
    quota = (CpuQuota(cfg.name, cfg.cpu_quota, reserved=reserves_cpu(cfg.role))
             if cfg.cpu_quota is not None else None)
    torch.set_num_threads(cfg.threads)
    if quota is not None:
        log.info("%s: limited to %g cores%s (%s)", cfg.name, cfg.cpu_quota,
                 ", reserved" if quota.reserved else "", quota.path)
    return quota


def transfer_config(cfg: InstanceConfig) -> TransferConfig:
    # The deployment's secret is expanded to the transport's minimum length so
    # short operator strings still work; both sides derive the same bytes.
    return TransferConfig(secret=hashlib.sha256(cfg.kv_secret.encode()).digest(),
                          io_timeout_s=max(10.0, cfg.kv_ttl_s))


def make_arena(cfg: InstanceConfig) -> Arena:
    """The decode arena: in shared memory when prefill writes into it one-sided."""
    if cfg.kv_transport == "shm":
        return ShmArena(cfg.kv_capacity_bytes)
    return Arena(cfg.kv_capacity_bytes)


def load_engine(cfg: InstanceConfig, arena: Arena | None = None) -> LLMEngine:
    """The engine of ``cfg``, warmed up (``warmup_tokens``) before the instance reports ready."""
    engine = LLMEngine.load(cfg.model, dtype=cfg.dtype, device=cfg.device, kv_arena=arena,
                            kv_capacity_bytes=cfg.kv_capacity_bytes)
    if cfg.warmup_tokens:
        took = warm_up(engine, cfg.warmup_tokens)
        log.info("%s: engine warmed up in %.0f ms (%d-token prompt, 2 tokens)", cfg.name,
                 took * 1e3, cfg.warmup_tokens)
    return engine


def warm_up(engine: LLMEngine, tokens: int) -> float:
    """Run one request of ``tokens`` prompt tokens and 2 output tokens (a prefill and a
    decode step) through ``engine``, freeing its KV; seconds taken.

    A fresh process pays its first forward pass's one-time costs (weights first
    touched, kernels and thread pools set up) on its first request: 1.1 s of
    ``small``'s first request on one core here, 40 ms of ``tiny``'s. Paid at load,
    the instance is not READY until it is, so no client request (and no request
    after a replacement or an upgrade) waits for it. A shape seen first later costs
    6-14 % more once (offline, ``small``, one core), not seconds.
    """
    vocab = engine.config.vocab_size
    prompt = [1 + (7 * i) % (vocab - 1) for i in range(tokens)]
    t0 = time.perf_counter()
    generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    return time.perf_counter() - t0


@dataclass(frozen=True)
class RoleParts:
    """What an instance keeps when it switches between prefill and decode in place:
    the weights (an engine whose arena the next role replaces) and its metrics
    (so counters go on counting). Everything else the old role releases."""

    engine: LLMEngine
    metrics: Any  # roles.metrics.InstanceMetrics (imports Triton's utils)


def engine_for(cfg: InstanceConfig, parts: RoleParts | None,
               arena: Arena | None = None) -> LLMEngine:
    """The role's engine: loaded from ``cfg``, or the kept weights over ``arena``
    (``None``: a local arena of ``kv_capacity_bytes``)."""
    if parts is None:
        return load_engine(cfg, arena)
    return parts.engine.with_arena(arena, kv_capacity_bytes=cfg.kv_capacity_bytes)


def close_arena(arena: Arena) -> None:
    if isinstance(arena, ShmArena):
        arena.close()
