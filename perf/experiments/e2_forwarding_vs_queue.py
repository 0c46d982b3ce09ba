"""E2: on-demand forwarding vs local prefill queues, 2 prefill + 1 decode (`small`).

Both deployments are the same 2P+1D except for admission:
  on-demand   a prefill accepts a prompt only with a free slot and rejects it
              at once otherwise; the router retries the next-ranked prefill with
              back-off (not asking a prefill whose slots all hold its own calls,
              and waking when one of them ends) and ends a request that cannot
              START prefill within its TTFT budget with UNAVAILABLE (early
              intervention).
  local-queue a prefill accepts into a local FIFO up to a cap; the router picks
              the prefill with the shortest queue (the baseline).

Order of a run:
  1 local-queue deployment: warm-up, unloaded TTFT (1 in flight), prefill
    capacity C (closed loop, twice as many in flight as prefill slots, so the
    queues never run dry), then Poisson load at 1x..5x C.
  2 the router's TTFT budget is derived from the SLO and the measured service
    time: a prompt takes S = slots / C under full load, so a request that starts
    prefill later than SLO - S misses the SLO anyway; budget = SLO - 2 S (the
    second S covers the router/client path and noise on the shared cores).
  3 on-demand deployment with that budget: warm-up, then the same offered rates.

TTFT SLO attainment is reported three ways, each labelled; the headline is
"admitted" (P/D-Serve reports attainment of the requests it serves):
  over all offered   an UNAVAILABLE (ended early) counts as a miss; at 5x load at
                     most ~1/5 of the requests can be served at all, so this
                     cannot reach 99% by construction
  over admitted      requests ended early are left out; a request that failed
                     after admission counts as a miss
  over served        completed requests only

    python -m perf.experiments.e2_forwarding_vs_queue [--quick]
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import DEADLINE_KIND, Slo, meets_ttft
from pdserve.bench.records import RequestRecord, RequestSpec
from pdserve.bench.workload import LengthDistribution, iter_arrivals, iter_synthetic_requests
from pdserve.server.config import InstanceConfig
from perf.experiments import common, host_speed, phases

NAME = "e2_forwarding_vs_queue"
# The router's early-intervention error; its text, since in-stream errors carry no code.
EARLY_END_TEXT = "within its TTFT budget"
DECODE_BATCH = 128


@dataclass(frozen=True)
class E2Config:
    model: str
    prompt_len: int
    output_len: int
    prefill_slots: int  # per prefill instance (max_batch_size)
    queue_cap: int  # local-queue baseline: prompts a prefill holds (queued + running)
    loads: tuple[float, ...]  # offered load as multiples of the measured capacity
    point_s: float  # seconds of arrivals per load point
    capacity_s: float  # seconds of the closed-loop capacity run
    ttft_slo_ms: float
    # Router TTFT budget (time to START prefill) = SLO - budget_margin * S, S the
    # measured service time of a prompt under full load; never below min_budget_s.
    # One S is the prefill itself, the other the router/client path and noise on
    # the shared cores at 5x (retries included): 1.5 S gave 95% in a quick run.
    budget_margin: float = 2.0
    min_budget_s: float = 0.05
    warmup_requests: int = 12
    unloaded_requests: int = 20
    # Taken on the on-demand deployment before its points, for the simulator's
    # validation only (perf/sim_validate.py fits the router's CPU per prefill
    # attempt to it): open loop at this multiple of the capacity, a load that is
    # not one of the points, with requests of another seed.
    overload_load: float = 4.0
    overload_s: float = 10.0
    # Before each point: the unloaded run's first requests again, one at a time (the
    # machine's speed then; perf/sim_validate.py --drift scales its engine by it).
    probe_requests: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.probe_requests <= self.unloaded_requests:
            raise ValueError("probe_requests must be in 0..unloaded_requests")
        if not self.loads or min(self.loads) <= 0:
            raise ValueError(f"loads must be positive, got {self.loads}")
        if self.budget_margin < 1:
            raise ValueError("budget_margin must be >= 1 (a started prefill must fit the SLO)")
        if not 0 < self.min_budget_s * 1000 < self.ttft_slo_ms:
            raise ValueError("min_budget_s must be positive and below the SLO")
        if self.prefill_slots < 1 or self.queue_cap < self.prefill_slots:
            raise ValueError("need prefill_slots >= 1 and queue_cap >= prefill_slots")

    @property
    def total_slots(self) -> int:
        return 2 * self.prefill_slots


FULL = E2Config(model="small", prompt_len=64, output_len=4, prefill_slots=1, queue_cap=256,
                loads=(1.0, 2.0, 3.0, 5.0), point_s=15.0, capacity_s=12.0, ttft_slo_ms=1200.0)
QUICK = replace(FULL, loads=(1.0, 5.0), point_s=6.0, capacity_s=5.0, warmup_requests=8,
                unloaded_requests=8, overload_s=3.0)
OVERLOAD_SEED = 96


def ttft_budget(cfg: E2Config, service_s: float) -> tuple[float, bool]:
    """(budget in s, clamped?): SLO - margin * S, at least ``min_budget_s``."""
    budget = cfg.ttft_slo_ms / 1000 - cfg.budget_margin * service_s
    return (budget, False) if budget >= cfg.min_budget_s else (cfg.min_budget_s, True)


def spec(cfg: E2Config, admission: str, ttft_budget_s: float) -> dict[str, Any]:
    """The 2P+1D deployment; ``admission`` is "on_demand" or "local_queue"."""
    doc: dict[str, Any] = {
        "model": cfg.model,
        "router": {"name": "pdserve", "num_threads": 1, "cpu_cores": "1"},
        "limits": {"max_tokens": 64, "max_batch_size": cfg.prefill_slots,
                   "kv_capacity_mb": 1024, "ttft_budget_s": ttft_budget_s},
        "kv": {"transport": "shm", "send_mode": "whole", "ttl_s": 30},
        # Both prefills share core 0 so that prefill, not the router, is the
        # bottleneck the experiment is about; decode, router and the load
        # generator have core 1.
        "scenarios": {"default": {"prefill": 2, "decode": 1,
                                  "cpu_cores": {"prefill": ["0"], "decode": ["1"]}}},
    }
    if admission == "local_queue":
        doc["limits"].update(local_queue_options(cfg))
    return doc


def adjust(cfg: E2Config) -> common.Adjust:
    """Prefill slots are the scarce resource; the decode batch must not be."""

    def apply(inst: InstanceConfig) -> InstanceConfig:
        if inst.role == "decode":
            return replace(inst, max_batch_size=DECODE_BATCH)
        return inst

    return apply


def local_queue_options(cfg: E2Config) -> dict[str, Any]:
    """The spec's switch to local FIFOs (``limits.admission: queue``, ``queue_cap``).

    With it the router picks the prefill with the shortest queue and sends the
    prompt there once; the prefill queues it behind its running batch.
    """
    return {"admission": "queue", "queue_cap": cfg.queue_cap}


def requests(cfg: E2Config, rate: float | None, count: int, seed: int) -> list[RequestSpec]:
    arrivals = iter_arrivals(rate, 1.0, seed=seed) if rate is not None else None
    it = iter_synthetic_requests(LengthDistribution(cfg.prompt_len, 0.0),
                                 LengthDistribution(cfg.output_len, 0.0), arrivals, seed=seed)
    return list(itertools.islice(it, count))


def unloaded_specs(cfg: E2Config) -> list[RequestSpec]:
    """The unloaded run's requests (and, first ones, each point's probe)."""
    return requests(cfg, None, cfg.unloaded_requests, seed=98)


def ended_early(record: RequestRecord) -> bool:
    """Refused by early intervention (UNAVAILABLE), as opposed to failing once admitted."""
    return record.error_kind == "UNAVAILABLE" or EARLY_END_TEXT in (record.error_message or "")


def attainment(records: Sequence[RequestRecord], slo: Slo) -> dict[str, Any]:
    finished = [r for r in records if r.error_kind != DEADLINE_KIND]
    admitted = [r for r in finished if not ended_early(r)]
    good = sum(1 for r in finished if meets_ttft(r, slo))
    samples: dict[str, str] = {}
    for r in finished:
        key = f"{r.error_kind} ({'ended early' if ended_early(r) else 'admitted'})"
        if r.error_kind and key not in samples:
            samples[key] = (r.error_message or "")[:300]
    return {
        "error_samples": samples,
        "finished": len(finished),
        "admitted": len(admitted),
        "ended_early": len(finished) - len(admitted),
        "failed_admitted": sum(1 for r in admitted if not r.is_ok),
        "good": good,
        "attainment_all": good / len(finished) if finished else None,
        "attainment_admitted": good / len(admitted) if admitted else None,
        "attainment_served": good / n_served if (n_served := sum(r.is_ok for r in finished))
        else None,
    }


def warmup(server: Any, cfg: E2Config, label: str, limit_s: float = 120.0) -> dict[str, Any]:
    """Unmeasured requests, as many in flight as there are prefill slots, until half
    of ``warmup_requests`` were served: each prefill and the decode have run their
    first, slow forwards. On-demand ends a request that meets a busy (cold)
    prefill within its budget, so a round may serve nothing while the first
    forwards run: the next round waits a second. Fails when nothing is served
    within ``limit_s``."""
    served = sent = rounds = 0
    began = time.monotonic()
    while True:
        run_ = common.drive(server, requests(cfg, None, cfg.warmup_requests, seed=99 + rounds),
                            label="warmup", concurrency=cfg.total_slots, request_timeout_s=120)
        rounds += 1
        sent += len(run_.records)
        ok = sum(r.is_ok for r in run_.records)
        served += ok
        if served >= cfg.warmup_requests // 2:
            return {"sent": sent, "served": served, "rounds": rounds,
                    "seconds": time.monotonic() - began}
        if time.monotonic() - began > limit_s:
            kinds = {r.error_kind: (r.error_message or "")[:200] for r in run_.records
                     if not r.is_ok}
            raise RuntimeError(f"warm-up of {label}: {served}/{sent} served in "
                               f"{limit_s:.0f} s; {kinds}")
        if not ok:
            time.sleep(1.0)


def measure(server: Any, cfg: E2Config) -> dict[str, Any]:
    """Unloaded TTFT, closed-loop capacity and the service time of a prompt under load."""
    url = server.options.metrics_url
    at_start = phases.totals(url)
    unloaded = common.drive(server, unloaded_specs(cfg),
                            label="unloaded", concurrency=1)
    after_unloaded = phases.totals(url)
    cap = common.drive(server, requests(cfg, None, 100_000, seed=97), label="capacity",
                       concurrency=2 * cfg.total_slots, max_duration_s=cfg.capacity_s)
    after_cap = phases.totals(url)
    done = [r for r in cap.records if r.is_ok]
    if not done:
        kinds = {r.error_kind: (r.error_message or "")[:200] for r in cap.records}
        raise RuntimeError(f"capacity run: no request succeeded; errors {kinds}")
    # Completed requests over the span they completed in (the deadline's cut
    # requests neither count nor stretch the span).
    span = max(r.end_s for r in done) - min(r.send_s for r in cap.records)
    capacity = len(done) / span
    return {"unloaded": common.summary_row(unloaded.summary()),
            "unloaded_requests": common.request_rows(unloaded.records),
            "unloaded_phases_ms": phases.point(at_start, after_unloaded, unloaded.records),
            "capacity_phases_ms": phases.point(after_unloaded, after_cap, cap.records),
            "capacity_req_per_s": capacity,
            # Little's law on the prefill stage, every slot busy: S = slots / C.
            "service_s": cfg.total_slots / capacity,
            "capacity_run": common.summary_row(cap.summary()),
            "capacity_cpu_cores": cap.cpu_cores,
            # when each ran: the host gauge gives each its slowdown
            "unloaded_window": unloaded.window(), "capacity_window": cap.window()}


def overload_run(server: Any, cfg: E2Config, capacity: float) -> dict[str, Any]:
    """On-demand at ``overload_load`` x capacity for ``overload_s``: the router retries
    prefills for a backlog it cannot serve (what the simulator's ``sweep_s`` is
    fitted to; not a point of the experiment)."""
    rate = cfg.overload_load * capacity
    specs = requests(cfg, rate, max(4, round(rate * cfg.overload_s)), seed=OVERLOAD_SEED)
    before = phases.totals(server.options.metrics_url)
    run_ = common.drive(server, specs, label="overload", max_duration_s=cfg.overload_s * 4 + 30,
                        request_timeout_s=60)
    row: dict[str, Any] = {"load": cfg.overload_load, "rate": rate, "offered": len(specs),
                           "seed": OVERLOAD_SEED, "bench": common.summary_row(run_.summary()),
                           "cpu_cores": run_.cpu_cores, **run_.window(),
                           "phases_ms": phases.point(
                               before, phases.totals(server.options.metrics_url), run_.records)}
    print(f"overload calibration {cfg.overload_load:g}x ({rate:.1f} req/s): TPOT p50 "
          f"{common.fmt(row['bench']['tpot_p50_ms'])} ms", flush=True)
    return row


def sweep(server: Any, cfg: E2Config, capacity: float, slo: Slo, label: str
          ) -> list[dict[str, Any]]:
    points = []
    for i, load in enumerate(cfg.loads):
        rate = load * capacity
        specs = requests(cfg, rate, max(4, round(rate * cfg.point_s)), seed=i)
        probe = common.probe(server, unloaded_specs(cfg)[: cfg.probe_requests])
        before = phases.totals(server.options.metrics_url)
        started = time.time()
        run_ = common.drive(server, specs, label=label, max_duration_s=cfg.point_s * 4 + 30,
                            request_timeout_s=60)
        point = {"admission": label, "load": load, "rate": rate, "offered": len(specs),
                 "started_at": started, "wall_s": run_.wall_s, "cpu_cores": run_.cpu_cores,
                 **attainment(run_.records, slo),
                 "bench": common.summary_row(run_.summary(slo)),
                 "phases_ms": phases.point(before, phases.totals(server.options.metrics_url),
                                           run_.records)}
        if probe is not None:
            point["probe"] = probe
        points.append(point)
        print(f"{label} {load}x ({rate:.1f} req/s): all {common.pct(point['attainment_all'])} "
              f"admitted {common.pct(point['attainment_admitted'])} "
              f"served {common.pct(point['attainment_served'])} "
              f"ended_early {point['ended_early']} failed_admitted {point['failed_admitted']} "
              f"ttft p50/p99 {common.fmt(point['bench']['ttft_p50_ms'])}/"
              f"{common.fmt(point['bench']['ttft_p99_ms'])} ms; {run_.wall_s:.0f} s; "
              f"errors {point['error_samples']}", flush=True)
    return points


def run(cfg: E2Config, quick: bool, out: Path | None = None) -> dict[str, Any]:
    out = out or common.out_dir(NAME, quick)
    out.mkdir(parents=True, exist_ok=True)
    slo = Slo(ttft_ms=cfg.ttft_slo_ms)
    started = time.monotonic()
    # The baseline's router waits for decode room (its only use of the budget
    # there) up to the SLO; its prefill queues have no early intervention.
    baseline = spec(cfg, "local_queue", cfg.ttft_slo_ms / 1000)
    doc: dict[str, Any] = {"experiment": NAME, "quick": quick, "config": asdict(cfg),
                           "slo": slo.__dict__, "machine": common.machine(),
                           "spec_local_queue": baseline, "points": []}
    with host_speed.HostSpeed(out / "host_speed.jsonl", engine_every=1) as gauge:
        measure_both(cfg, doc, out, slo)
        m = doc.get("measured") or {}
        calibration = [m[k] for k in ("unloaded_window", "capacity_window", "overload_run")
                       if k in m]
        doc["host_speed"] = host_speed.annotate_all(doc["points"] + calibration, gauge)
    doc["machine_after"] = common.machine()
    doc["wall_s"] = time.monotonic() - started
    common.write_json(out / "e2.json", doc)
    doc["png"] = str(plot(doc, out / "e2.png"))
    return doc


def measure_both(cfg: E2Config, doc: dict[str, Any], out: Path, slo: Slo) -> None:
    """The local-queue baseline, then on-demand forwarding at the same offered rates."""
    baseline = doc["spec_local_queue"]
    with common.deployed(baseline, out / "local_queue", adjust=adjust(cfg)) as server, \
            common.client_on({1}):
        doc["warmup_local_queue"] = warmup(server, cfg, "local_queue")
        doc["measured"] = measure(server, cfg)
        capacity, service_s = doc["measured"]["capacity_req_per_s"], doc["measured"]["service_s"]
        budget, clamped = ttft_budget(cfg, service_s)
        doc["ttft_budget_s"], doc["ttft_budget_clamped"] = budget, clamped
        print(f"capacity {capacity:.2f} req/s, service under load {1000 * service_s:.0f} ms "
              f"-> router TTFT budget {1000 * budget:.0f} ms{' (clamped)' if clamped else ''}; "
              f"unloaded {doc['measured']['unloaded']['ttft_p50_ms']} ms", flush=True)
        doc["points"] += sweep(server, cfg, capacity, slo, "local_queue")
    doc["spec_on_demand"] = spec(cfg, "on_demand", budget)
    with common.deployed(doc["spec_on_demand"], out / "on_demand",
                         adjust=adjust(cfg)) as server, common.client_on({1}):
        doc["warmup_on_demand"] = warmup(server, cfg, "on_demand")
        doc["measured"]["overload_run"] = overload_run(server, cfg, capacity)
        # Same offered rates: multiples of the capacity measured on the baseline.
        doc["points"] += sweep(server, cfg, capacity, slo, "on_demand")


def _overload_note(measured: dict[str, Any]) -> str:
    over = measured.get("overload_run")
    if over is None:
        return ""
    tpot = over["bench"].get("tpot_p50_ms")
    return (f"  \nBefore its points the on-demand deployment ran {over['offered']} requests at "
            f"{over['load']:g}x ({over['rate']:.1f} req/s; not a point: it is what "
            f"`perf/sim_validate.py` fits the router's work per prefill sweep to): TPOT p50 "
            f"{common.fmt(tpot)} ms.")


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {("on_demand", "attainment_admitted"): ("o-", "on-demand, admitted requests"),
              ("on_demand", "attainment_all"): ("o:", "on-demand, all (ended early = miss)"),
              ("on_demand", "attainment_served"): ("^-.", "on-demand, served requests"),
              ("local_queue", "attainment_admitted"): ("s--", "local queue, admitted requests"),
              ("local_queue", "attainment_all"): ("s:", "local queue, all")}
    for (label, key), (style, name) in styles.items():
        pts = [p for p in doc["points"] if p["admission"] == label]
        if pts:
            ys = [served(p) if key == "attainment_served" else p[key] for p in pts]
            ax.plot([p["load"] for p in pts], [100 * (y or 0) for y in ys], style,
                    label=name)
    ax.set_xlabel("offered load (x measured prefill capacity)")
    ax.set_ylabel(f"TTFT SLO attainment (%), SLO {doc['slo']['ttft_ms']:.0f} ms")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"E2 {doc['config']['model']} 2P+1D: on-demand forwarding vs local prefill queues")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(doc: dict[str, Any], figure: str | None) -> str:
    cfg, m, ms = doc["config"], doc["machine"], doc["measured"]
    u = ms["unloaded"]
    slots = 2 * cfg["prefill_slots"]
    budget_ms = 1000 * doc["ttft_budget_s"]
    lines = [
        "## E2: on-demand forwarding vs local prefill queues, 2P+1D — experiments",
        "",
        f"Command: `.venv/bin/python -m perf.experiments.{NAME}` "
        f"({doc.get('wall_s', 0) / 60:.1f} min)  ",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores shared with other engineers' "
        f"jobs, load average {m['load_average']} before / {doc['machine_after']['load_average']} "
        f"after, {m['date_utc']}.  ",
        f"Deployment: `{cfg['model']}`, prefill_0 and prefill_1 both on core 0 with "
        f"{cfg['prefill_slots']} slot(s) each; decode_0, the router and the load generator on "
        "core 1; shm KV. "
        f"Requests: {cfg['prompt_len']}-token prompts, {cfg['output_len']} output tokens, "
        f"Poisson arrivals, {cfg['point_s']:.0f} s of arrivals per load point; each deployment "
        f"is warmed up ({cfg['warmup_requests']} unmeasured requests, {slots} in flight) "
        "before it is measured.  ",
        f"Measured on the local-queue deployment: unloaded TTFT p50 {u['ttft_p50_ms']:.1f} ms, "
        f"p90 {u['ttft_p90_ms']:.1f} ms (1 in flight); prefill capacity "
        f"C = **{ms['capacity_req_per_s']:.2f} req/s** (closed loop, {2 * slots} in flight, "
        f"{cfg['capacity_s']:.0f} s), so a prompt holds a slot S = {slots}/C = "
        f"{1000 * ms['service_s']:.0f} ms under full load. Load = offered Poisson rate / C; "
        "both deployments get the same rates.  ",
        f"**TTFT SLO {cfg['ttft_slo_ms']:.0f} ms.** On-demand router TTFT budget (time to "
        f"START prefill; early intervention ends a request that cannot) = SLO - "
        f"{cfg['budget_margin']:g} S = **{budget_ms:.0f} ms**"
        + (f" (clamped to the minimum {1000 * cfg['min_budget_s']:.0f} ms: the SLO leaves no "
           "room on this machine now)" if doc.get("ttft_budget_clamped") else "")
        + "; a started prefill is never cut at the budget. The local-queue router waits up "
        "to the SLO for decode room and never refuses a prompt for lack of a prefill slot."
        + _overload_note(ms),
        "",
        "Attainment = requests whose first token came within the SLO, over: all offered "
        "(ended early = miss), admitted (ended early left out; failed after admission = miss; "
        "**the headline**, as P/D-Serve reports it), served (completed). At Nx load at most "
        "~1/N of the offered requests can be served at all, so attainment over all offered "
        "cannot reach 99% above 1x by construction.",
        "",
        "| admission | load | rate req/s | offered | ended early (UNAVAILABLE) | failed after "
        "admission | TTFT p50/p99 ms (served) | attainment, all offered | **attainment, "
        "admitted** | attainment, served |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in doc["points"]:
        b = p["bench"]
        lines.append(
            f"| {p['admission']} | {p['load']:g}x | {p['rate']:.1f} | {p['offered']} | "
            f"{p['ended_early']} | {p['failed_admitted']} | "
            f"{common.fmt(b['ttft_p50_ms'])}/{common.fmt(b['ttft_p99_ms'])}"
            f" | {common.pct(p['attainment_all'])} | "
            f"**{common.pct(p['attainment_admitted'])}** | {common.pct(served(p))} |")
    lines += ["", *verdict(doc), *phases_table(doc["points"])]
    lines += ["", "Why `small`, not `tiny`: with `tiny` a prefill costs less than the router's "
              "own work per request, so 5x its capacity overloaded the router and the shared "
              "cores, not the prefills (measured: capacity 37 req/s, 5x = 185 req/s, served "
              "TTFT p50 1.8 s). In both modes the router reserves decode KV and a decode batch "
              "slot before the prefill, so prompts waiting in local queues hold decode slots too.",
              "", "First error message per kind and point:"]
    for p in doc["points"]:
        for kind, msg in p.get("error_samples", {}).items():
            lines.append(f"- {p['admission']} {p['load']:g}x {kind}: `{msg[:160]}`")
    lines += host_speed.note(doc, doc["points"], lambda p: f"{p['admission']} {p['load']:g}x")
    if figure:
        lines += ["", f"![E2]({figure})"]
    return "\n".join(lines)


def phases_table(points: list[dict[str, Any]]) -> list[str]:
    """The served requests' mean TTFT split by phase (points that recorded them)."""
    rows = [p for p in points if p.get("phases_ms")]
    if not rows:
        return []
    lines = ["", "Where the served requests' first-token time went (means, ms; the router's "
             "`pdserve_request_*_seconds` and the prefills' `pdserve_prefill_forward_seconds` "
             "over the point): reserve = arrival to the decode's KV reservation; wait = to "
             "the send of the accepted prefill call; call = that call, of which forward = the "
             "prefill's forward; delivery = the client's TTFT less the router's (the token's "
             "way through Triton to the client).", "",
             "| admission | load | reserve | wait | call | forward | router TTFT | delivery | "
             "client TTFT |", "|---|---|---|---|---|---|---|---|---|"]
    for p in rows:
        ph = p["phases_ms"]
        cells = [common.fmt(ph.get(k)) for k in ("reserve", "prefill_wait", "prefill_call",
                                                  "prefill_forward", "router_ttft", "delivery",
                                                  "client_ttft")]
        lines.append(f"| {p['admission']} | {p['load']:g}x | " + " | ".join(cells) + " |")
    return lines


def served(point: dict[str, Any]) -> float | None:
    """Attainment over requests that completed (older JSON lacks the field)."""
    if "attainment_served" in point:
        return point["attainment_served"]
    ok = point["bench"]["ok"]
    return point["good"] / ok if ok else None


def verdict(doc: dict[str, Any]) -> list[str]:
    """The goal (>= 99% of admitted requests at 5x, where the queue baseline falls)."""
    top = max(doc["config"]["loads"])
    at_top = {p["admission"]: p for p in doc["points"] if p["load"] == top}
    lines = []
    od = at_top.get("on_demand")
    if od:
        met = "met" if (od["attainment_admitted"] or 0) >= 0.99 else "NOT met"
        lines.append(
            f"- At {top:g}x, on-demand: **{common.pct(od['attainment_admitted'])} of admitted "
            f"requests met the TTFT SLO** (goal of >= 99% {met}); "
            f"{od['ended_early']} of {od['finished']} were ended early with "
            f"UNAVAILABLE, {od['failed_admitted']} failed after admission; "
            f"{common.pct(served(od))} of served requests and {common.pct(od['attainment_all'])} "
            "of all offered met it.")
    lq = at_top.get("local_queue")
    if lq:
        lines.append(
            f"- At {top:g}x, local queues: {common.pct(lq['attainment_admitted'])} of admitted "
            f"and {common.pct(lq['attainment_all'])} of all offered requests met it (TTFT p99 "
            f"{common.fmt(lq['bench']['ttft_p99_ms'], '.0f')} ms): no prompt is refused for "
            "lack of a prefill slot, so queued prompts wait past the SLO.")
    below = [f"{p['load']:g}x {common.pct(p['attainment_admitted'])}" for p in doc["points"]
             if p["admission"] == "on_demand" and (p["attainment_admitted"] or 0) < 0.99]
    if od and below:
        lines.append(f"- On-demand below 99% of admitted at: {', '.join(below)}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, key="e2", name=NAME, description=__doc__.split("\n")[0],
                       quick_help="2 short load points", plot=plot, markdown=markdown,
                       run=lambda args: run(QUICK if args.quick else FULL, args.quick, args.out))

if __name__ == "__main__":
    raise SystemExit(main())
