"""E3: dynamic P/D ratio (the controller) vs each static ratio on 4 `tiny` instances.

Traffic shifts like day and night between two request mixes, each phase a
closed loop of ``concurrency`` requests:
  prompt-heavy  long prompts, a few output tokens   (wants prefill instances)
  output-heavy  short prompts, long outputs         (wants decode instances)
Each static ratio (1P3D, 2P2D, 3P1D) gets its own tritonserver, a warm-up, and
``static_phase_s`` of each distinct mix (a static deployment has nothing that
changes between phases of the same mix, so a repeated mix is not measured
again). A dynamic run starts at a given ratio (``starts``) with ``pdserve
controller`` watching the instances and switching their roles; it gets a
warm-up and then every phase in order, ``phase_s`` each. There is one dynamic
run per way of switching (``role_switches``) and start: ``dynamic`` switches in
place (``--role-switch live``: the drained instance keeps its weights and
serves its new role within a second), ``dynamic-reload`` through the
repository (Triton reloads the instance in its new role); a start other than
2P2D is named in the label (``dynamic from 1P3D``). Per phase: request and output-token throughput
over the whole phase (the headline: the controller's reaction time counts
against it) and over its second half (settled), SLO attainment, and each role
switch's cost (drain, switch) from the controller's log.

The static ratios are measured ``static_passes`` times: with 2 (the full run),
once before the dynamic runs and once after, compared as the mean, since the
shared machine's load drifts over a run by more than the ratios differ (the
same ratio measured 1.2-1.4x apart on two servers minutes apart).

Instances alternate between the two cores (prefill_i on core i%2, decode_i on
core (i+1)%2) so every ratio spreads its instances 2/2 over the cores, and each
holds ``slots`` requests (prefill slots / decode batch), which is what a
ratio trades: 1P3D has 4 prompt slots and 12 decode slots, 3P1D the reverse.

    python -m perf.experiments.e3_dynamic_ratio [--quick]
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import Slo
from pdserve.bench.records import RequestSpec
from pdserve.bench.workload import LengthDistribution, iter_synthetic_requests
from pdserve.scheduler.controller.protocol import CONTROL_INPUT
from pdserve.scheduler.ratio import RatioPolicy
from pdserve.server import config as server_config
from pdserve.server.config import InstanceConfig
from pdserve.server.launcher import TritonServer, free_port
from pdserve.server.repo import config_pbtxt
from perf.experiments import common, host_speed, process_cpu

NAME = "e3_dynamic_ratio"
STATIC = ((1, 3), (2, 2), (3, 1))  # (prefill, decode)


@dataclass(frozen=True)
class Phase:
    name: str
    input_len: int
    output_len: int


@dataclass(frozen=True)
class E3Config:
    phases: tuple[Phase, ...]
    concurrency: int
    phase_s: float  # dynamic run: seconds per phase
    static_phase_s: float  # static ratios: seconds per distinct mix
    slots: int
    slo_ttft_ms: float
    slo_tpot_ms: float
    ratio_interval_s: float  # controller: ratio window (how often it re-decides)
    ratio_cooldown_s: float  # controller: no new switch this long after one
    drain_timeout_s: float  # controller: switch anyway after draining this long
    probe_interval_s: float  # controller: heartbeats (and slot-occupancy samples)
    ratio_min_peak: float  # controller: switch only when the busier stage is this busy
    # controller, online trigger: E2E rise factor and TTFT-share change; latency on
    # the shared 2-core box swings ~1.4x between windows (a full run switched on
    # "E2E up 1.44x with TTFT share up +0.06" in the middle of a phase)
    ratio_e2e_rise: float
    ratio_share_delta: float
    # controller: keep what each ratio did with a mix this long after it went, and
    # go to the best one when the mix returns (``RatioPolicy.recall_s``); 0: off
    ratio_recall_s: float = 0.0
    # controller: try a switch the model predicts to gain more than this but within
    # the tolerance, where its ratio is unmeasured (``RatioPolicy.explore_gain``); 0: off
    ratio_explore_gain: float = 0.0
    # controller: instances one decision may move (``RatioPolicy.max_step``)
    ratio_max_step: int = 1
    # controller: the window after one of a changing mix (``RatioPolicy.mix_window_s``);
    # 0: off
    ratio_mix_window_s: float = 0.0
    warmup_requests: int = 16
    # one dynamic run per way of switching roles ("live": in place) and start ratio
    role_switches: tuple[str, ...] = ("live", "reload")
    starts: tuple[str, ...] = ("2P2D",)
    # run the dynamic deployments before the static ones (the shared machine's
    # load drifts over a run; swapping the order between runs shows how much)
    dynamic_first: bool = False
    # static ratios measured this many times: with 2, once before and once after the
    # dynamic runs, and compared as the mean (a drift of the machine's load over the
    # run then weighs on both sides alike)
    static_passes: int = 1
    # static passes between the dynamic runs (static, dynamic, static, dynamic, ...,
    # static: static_passes = dynamic runs + 1), and each dynamic run also judged
    # against the passes right before and after it, minutes away rather than a
    # whole run: the shared machine's speed moves 10-40 % within a run
    interleave: bool = False
    # cores of CPU time each instance owns (``cpu_quota``, a cgroup per instance), as
    # an NPU instance owns its device: a ratio then moves compute, not only slots
    # (``e3_owned``); None: the instances share the two cores as they come
    cpu_quota: float | None = None

    def __post_init__(self) -> None:
        if not self.phases or self.phase_s <= 0 or self.static_phase_s <= 0 \
                or self.concurrency < 1 or self.slots < 1:
            raise ValueError("need phases, phase_s > 0, static_phase_s > 0, "
                             "concurrency >= 1 and slots >= 1")
        if not 0 < self.probe_interval_s <= self.ratio_interval_s:
            raise ValueError("need 0 < probe_interval_s <= ratio_interval_s")
        if not set(self.role_switches) <= {"live", "reload"}:
            raise ValueError(f"role_switches must be 'live' or 'reload', "
                             f"got {self.role_switches}")
        if self.ratio_max_step < 1:
            raise ValueError(f"ratio_max_step must be >= 1, got {self.ratio_max_step}")
        if not 0 <= self.ratio_mix_window_s <= self.ratio_interval_s:
            raise ValueError(f"ratio_mix_window_s must be in [0, ratio_interval_s], got "
                             f"{self.ratio_mix_window_s}")
        if self.static_passes < 1:
            raise ValueError(f"static_passes must be >= 1, got {self.static_passes}")
        runs = len(self.role_switches) * len(self.starts)
        if self.interleave and (self.dynamic_first or self.static_passes != runs + 1):
            raise ValueError(f"interleave needs static_passes = dynamic runs + 1 = {runs + 1} "
                             f"and static first, got static_passes={self.static_passes}, "
                             f"dynamic_first={self.dynamic_first}")
        for start in self.starts:
            n_p, n_d = parse_ratio(start)
            if n_p + n_d != 4:
                raise ValueError(f"a start ratio has 4 instances, got {start!r}")

    def mixes(self) -> list[Phase]:
        """The distinct request mixes, in order of first appearance."""
        seen: dict[str, Phase] = {}
        for phase in self.phases:
            seen.setdefault(mix(phase), phase)
        return list(seen.values())


def parse_ratio(text: str) -> tuple[int, int]:
    """``"1P3D"`` -> (1, 3); at least one of each."""
    m = re.fullmatch(r"(\d+)P(\d+)D", text)
    if m is None or min(int(m.group(1)), int(m.group(2))) < 1:
        raise ValueError(f"a ratio is written like 1P3D, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def mix(phase: Phase | dict[str, Any]) -> str:
    if isinstance(phase, Phase):
        return f"{phase.input_len}/{phase.output_len}"
    return f"{phase['input_len']}/{phase['output_len']}"


FULL = E3Config(phases=(Phase("prompt-heavy", 900, 4), Phase("output-heavy", 16, 160),
                        Phase("prompt-heavy", 900, 4)),
                concurrency=16, phase_s=60.0, static_phase_s=20.0, slots=4,
                slo_ttft_ms=500.0, slo_tpot_ms=50.0, ratio_interval_s=4.0,
                ratio_cooldown_s=8.0, drain_timeout_s=10.0, probe_interval_s=1.0,
                ratio_min_peak=0.7, ratio_e2e_rise=2.0, ratio_share_delta=0.15,
                role_switches=("live",), starts=("1P3D", "2P2D"), static_passes=2)
QUICK = replace(FULL, phases=FULL.phases[:2], phase_s=15.0, static_phase_s=5.0,
                warmup_requests=8, role_switches=("live",), starts=("2P2D",), static_passes=1)


def dynamic_label(role_switch: str, start: str = "2P2D") -> str:
    label = "dynamic" if role_switch == "live" else f"dynamic-{role_switch}"
    return label if start == "2P2D" else f"{label} from {start}"


def is_dynamic(label: str) -> bool:
    return label.startswith("dynamic")


def spec(cfg: E3Config, n_prefill: int, n_decode: int) -> dict[str, Any]:
    group: dict[str, Any] = {"prefill": n_prefill, "decode": n_decode,
                             "cpu_cores": {"prefill": ["0", "1"], "decode": ["1", "0"]}}
    if cfg.cpu_quota is not None:
        group["cpu_quota"] = cfg.cpu_quota
    return {
        "model": "tiny",
        "router": {"name": "pdserve", "num_threads": 1},
        "limits": {"max_tokens": 256, "max_batch_size": cfg.slots, "kv_capacity_mb": 64,
                   "ttft_budget_s": 60},
        "kv": {"transport": "shm", "send_mode": "whole", "ttl_s": 30},
        "scenarios": {"default": group},
    }


def dynamic_blockers() -> list[str]:
    """Why the controller cannot drive real pdserve instances yet (empty: it can)."""
    blockers = []
    instance = config_pbtxt(InstanceConfig(name="prefill_0", role="prefill"))
    if f'"{CONTROL_INPUT}"' not in instance:
        blockers.append(
            f"instance models declare no `{CONTROL_INPUT}` heartbeat input "
            "(server/repo.py INSTANCE_IO has only op/payload), so every controller "
            "heartbeat fails and the controller would treat all 4 instances as dead")
    if "generation" not in getattr(server_config, "RELOAD_ONLY_KEYS", ()):
        blockers.append(
            "instances do not accept the controller's `generation` parameter, so a role "
            "switch or reload edit through the repository fails to load")
    return blockers


def phase_requests(phase: Phase, seed: int) -> Iterator[RequestSpec]:
    return iter_synthetic_requests(LengthDistribution(phase.input_len, 0.0),
                                   LengthDistribution(phase.output_len, 0.0), None, seed=seed)


def warmup(server: TritonServer, cfg: E3Config) -> None:
    """Unmeasured: every mix once, enough in flight to reach every instance."""
    for i, phase in enumerate(cfg.mixes()):
        common.drive(server, list(itertools.islice(phase_requests(phase, 90 + i),
                                                   cfg.warmup_requests)),
                     label="warmup", concurrency=cfg.concurrency, request_timeout_s=120)


def run_phases(server: TritonServer, cfg: E3Config, label: str, slo: Slo,
               phases: list[tuple[int, Phase]], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for i, phase in phases:
        started = time.time()
        run_ = common.drive(server, list(itertools.islice(phase_requests(phase, i), 100_000)),
                            label=label, concurrency=cfg.concurrency,
                            max_duration_s=seconds, request_timeout_s=60)
        # Second half of the phase: what the deployment does once settled.
        half = [r for r in run_.records if r.is_ok and r.end_s >= seconds / 2]
        row = {"deployment": label, "phase": phase.name, "index": i, "mix": mix(phase),
               "started_at": started, "seconds": seconds,
               "settled_req_per_s": len(half) / (seconds / 2),
               **common.summary_row(run_.summary(slo)), "cpu_cores": run_.cpu_cores}
        rows.append(row)
        print(f"{label} phase {i} {phase.name}: {row['req_per_s']:.2f} req/s "
              f"(second half {row['settled_req_per_s']:.2f}) {row['out_tok_per_s']:.0f} tok/s "
              f"att {common.pct(row['slo_attainment'])}", flush=True)
    return rows


@contextlib.contextmanager
def controller(server: TritonServer, cfg: E3Config, workdir: Path,
               role_switch: str) -> Iterator[Path]:
    """``pdserve controller`` on the server's repository; always stopped."""
    o = server.options
    log = workdir / "controller.log"
    edits = workdir / "edits.jsonl"
    cmd = [sys.executable, "-m", "pdserve.cli", "controller", "--repository",
           str(o.repository), "--server", f"{o.host}:{o.http_port}:{o.metrics_port}",
           *controller_args(cfg), "--role-switch", role_switch,
           "--metrics-port", str(free_port()), "--edit-log", str(edits)]
    edits.unlink(missing_ok=True)  # an earlier run's, when --out is reused
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield edits
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def controller_args(cfg: E3Config) -> list[str]:
    return ["--probe-interval-s", f"{cfg.probe_interval_s:g}",
            "--ratio-interval-s", f"{cfg.ratio_interval_s:g}",
            "--ratio-cooldown-s", f"{cfg.ratio_cooldown_s:g}",
            "--drain-timeout-s", f"{cfg.drain_timeout_s:g}",
            "--ratio-min-peak", f"{cfg.ratio_min_peak:g}",
            "--ratio-e2e-rise", f"{cfg.ratio_e2e_rise:g}",
            "--ratio-share-delta", f"{cfg.ratio_share_delta:g}",
            *(["--ratio-recall-s", f"{cfg.ratio_recall_s:g}"] if cfg.ratio_recall_s else []),
            *(["--ratio-explore-gain", f"{cfg.ratio_explore_gain:g}"]
              if cfg.ratio_explore_gain else []),
            *(["--ratio-max-step", str(cfg.ratio_max_step)] if cfg.ratio_max_step > 1 else []),
            *(["--ratio-mix-window-s", f"{cfg.ratio_mix_window_s:g}"]
              if cfg.ratio_mix_window_s else [])]


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")
_DRAIN = re.compile(r"^ratio: draining (\S+) to make it (\w+) \((.*)\)$")
_EDIT = re.compile(r"^repository edit switch_role (\S+):")
_IN_PLACE = re.compile(r"^ratio: (\S+) serves \w+ \(switched in place\)")
_BACK = re.compile(r"^ratio: (\S+) back in routing as \w+")
_STATE = re.compile(r"^(\S+) on \S+: (\w+) -> (\w+)")
_DECISION = re.compile(r"^ratio (\S+): (\w+) (\d+P\d+D) \((.*)\)$")


def log_messages(log_text: str) -> Iterator[tuple[float, str]]:
    """(time, message) of each line of the controller's log."""
    for line in log_text.splitlines():
        if m := _LOG_LINE.match(line):
            yield dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(2)


def decisions(log_text: str) -> list[dict[str, Any]]:
    """The controller's ratio decisions as it logged them (each new kind of answer)."""
    return [{"at": at, "scenario": d.group(1), "action": d.group(2), "ratio": d.group(3),
             "reason": d.group(4)}
            for at, msg in log_messages(log_text) if (d := _DECISION.match(msg))]


def switch_costs(log_text: str) -> list[dict[str, Any]]:
    """Each role switch from the controller's log: when draining began, when the
    role was switched (drained: repository edited, or switched in place), when
    the instance was healthy again (reloaded; in place: the drain lifted)."""
    switches: list[dict[str, Any]] = []
    open_: dict[str, dict[str, Any]] = {}
    for at, msg in log_messages(log_text):
        if d := _DRAIN.match(msg):
            open_[d.group(1)] = {"instance": d.group(1), "to_role": d.group(2),
                                 "drain_at": at, "reason": d.group(3), "how": "reload"}
        elif (e := _EDIT.match(msg)) and e.group(1) in open_:
            open_[e.group(1)]["switched_at"] = at
        elif (e := _IN_PLACE.match(msg)) and e.group(1) in open_:
            open_[e.group(1)].update(switched_at=at, how="in place")
        elif (b := _BACK.match(msg)) and "switched_at" in open_.get(b.group(1), {}):
            open_[b.group(1)]["healthy_at"] = at
            switches.append(open_.pop(b.group(1)))
        elif (st := _STATE.match(msg)) and st.group(1) in open_:
            sw = open_[st.group(1)]
            if st.group(2) == "loading" and st.group(3) == "healthy" and "switched_at" in sw:
                sw["healthy_at"] = at
                switches.append(open_.pop(st.group(1)))
    switches += open_.values()  # not back before the run ended
    for sw in switches:
        if "switched_at" in sw:
            sw["drain_s"] = sw["switched_at"] - sw["drain_at"]
        if "healthy_at" in sw:
            sw["reload_s"] = sw["healthy_at"] - sw["switched_at"]
            sw["total_s"] = sw["healthy_at"] - sw["drain_at"]
    return sorted(switches, key=lambda sw: sw["drain_at"])


def run(cfg: E3Config, quick: bool, out: Path | None = None) -> dict[str, Any]:
    out = out or common.out_dir(NAME, quick)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    slo = Slo(ttft_ms=cfg.slo_ttft_ms, tpot_ms=cfg.slo_tpot_ms)
    doc: dict[str, Any] = {"experiment": NAME, "quick": quick, "config": asdict(cfg),
                           "controller_args": controller_args(cfg),
                           "compute_busy": RatioPolicy.compute_busy,
                           "slo": slo.__dict__, "machine": common.machine(), "rows": []}
    blockers = dynamic_blockers()
    doc["dynamic_blockers"] = blockers
    doc["controller_edits"], doc["switches"] = [], []
    with host_speed.HostSpeed(out / "host_speed.jsonl") as gauge:
        measure_all(cfg, doc, out, slo)
        doc["host_speed"] = host_speed.annotate_all(doc["rows"], gauge)
    doc["machine_after"] = common.machine()
    doc["wall_s"] = time.monotonic() - began
    doc["verdict"] = verdict(doc)
    common.write_json(out / "e3.json", doc)
    doc["png"] = str(plot(doc, out / "e3.png"))
    return doc


SERVER_TRIES = 2  # a deployment whose tritonserver died is measured again, once


def on_a_live_server(doc: dict[str, Any], what: str, workdir: Path,
                     measure: Callable[[Path], None]) -> None:
    """``measure(workdir)`` (it deploys, measures and adds its rows to ``doc`` only
    when it finished), again on a fresh server in ``<workdir>_retry<n>`` when the
    tritonserver died under it (``common.ServerDied``: Triton 2.51 aborts on
    upstream races; the E3 run of 21:57 UTC on 2026-12-06 lost two deployments this
    way, a gRPC "ASSERTION FAILED: prior > 0"). Each death is kept in ``doc["server_deaths"]``
    and said in the results; a second death in a row ends the experiment."""
    for attempt in range(SERVER_TRIES):
        try:
            measure(workdir if attempt == 0 else workdir.with_name(
                f"{workdir.name}_retry{attempt}"))
            return
        except common.ServerDied as exc:
            doc.setdefault("server_deaths", []).append(
                {"what": what, "attempt": attempt + 1, "at": time.time(), "error": str(exc)})
            if attempt + 1 == SERVER_TRIES:
                raise
            print(f"{what}: {exc}; measured again on a fresh server", flush=True)


def measure_all(cfg: E3Config, doc: dict[str, Any], out: Path, slo: Slo) -> None:
    """The static passes and the dynamic runs, in the configured order."""
    passes = list(range(cfg.static_passes))
    if cfg.interleave:  # static, then per dynamic run: that run, a static pass
        run_static(cfg, doc, out, slo, 0)
        runs = dynamic_runs(cfg, doc)
        for k, one in enumerate(runs, start=1):
            run_dynamic(cfg, doc, out, slo, [one], bracket=(k - 1, k))
            run_static(cfg, doc, out, slo, k)
        passes = passes[len(runs) + 1:]  # blocked dynamic runs: the passes still run
    elif cfg.dynamic_first:
        run_dynamic(cfg, doc, out, slo)
    else:  # static, dynamic, then the other static passes
        run_static(cfg, doc, out, slo, passes.pop(0))
        run_dynamic(cfg, doc, out, slo)
    for k in passes:
        run_static(cfg, doc, out, slo, k)


def run_static(cfg: E3Config, doc: dict[str, Any], out: Path, slo: Slo, k: int = 0) -> None:
    index = {mix(p): i for i, p in reversed(list(enumerate(cfg.phases)))}
    for n_p, n_d in STATIC:
        label = f"{n_p}P{n_d}D"

        def measure(workdir: Path, n_p: int = n_p, n_d: int = n_d, label: str = label) -> None:
            with common.deployed(spec(cfg, n_p, n_d), workdir) as server:
                warmup(server, cfg)
                rows = run_phases(server, cfg, label, slo,
                                  [(index[mix(p)], p) for p in cfg.mixes()], cfg.static_phase_s)
            doc["rows"] += [dict(r, **{"pass": k}) for r in rows]

        on_a_live_server(doc, f"{label} (pass {k + 1})", out / f"{label}_pass{k}", measure)


def static_means(doc: dict[str, Any], phase_index: int,
                 passes: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Static deployment -> mean req/s and SLO attainment over its passes (or only
    over ``passes``), for the mix of phase ``phase_index`` (one entry per pass
    under "passes")."""
    phase = doc["config"]["phases"][phase_index]
    acc: dict[str, list[dict[str, Any]]] = {}
    for r in doc["rows"]:
        if not is_dynamic(r["deployment"]) and r.get("mix", mix(phase)) == mix(phase) \
                and ("mix" in r or r["index"] == phase_index) \
                and (passes is None or r.get("pass") in passes):
            acc.setdefault(r["deployment"], []).append(r)
    return {d: {"req_per_s": sum(r["req_per_s"] for r in rs) / len(rs),
                "slo_attainment": sum(r["slo_attainment"] or 0 for r in rs) / len(rs),
                "passes": [r["req_per_s"] for r in rs]}
            for d, rs in acc.items()}


def dynamic_runs(cfg: E3Config, doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(role switch, start ratio) of each dynamic run; none where a blocker stops them."""
    return [] if doc["dynamic_blockers"] else list(itertools.product(cfg.role_switches,
                                                                      cfg.starts))


def run_dynamic(cfg: E3Config, doc: dict[str, Any], out: Path, slo: Slo,
                runs: list[tuple[str, str]] | None = None,
                bracket: tuple[int, int] | None = None) -> None:
    """The dynamic runs (all, or ``runs``); ``bracket``: the static passes right
    before and after them, noted on their rows for the verdict."""
    for role_switch, start in dynamic_runs(cfg, doc) if runs is None else runs:
        label = dynamic_label(role_switch, start)

        def measure(workdir: Path, role_switch: str = role_switch, start: str = start,
                    label: str = label) -> None:
            # Poll every second so a role switch the controller writes is loaded soon.
            with common.deployed(spec(cfg, *parse_ratio(start)), workdir,
                                 poll_secs=1) as server:
                warmup(server, cfg)
                with controller(server, cfg, workdir, role_switch) as edits:
                    rows = run_phases(server, cfg, label, slo, list(enumerate(cfg.phases)),
                                      cfg.phase_s)
                    edited = edits.read_text().splitlines() if edits.exists() else []
            doc["rows"] += [r if bracket is None else dict(r, bracket=list(bracket))
                            for r in rows]
            doc["controller_edits"] += edited
            log_text = (workdir / "controller.log").read_text() \
                if (workdir / "controller.log").exists() else ""
            doc["switches"] += [dict(sw, run=label) for sw in switch_costs(log_text)]
            doc.setdefault("decisions", []).extend(
                dict(d, run=label) for d in decisions(log_text))

        on_a_live_server(doc, label, out / label.replace(" ", "_"), measure)


def _pct(ratio: float) -> str:
    """A share of the best; one decimal just below the 90 % goal, where rounding
    would show a miss as "90%"."""
    return f"{100 * ratio:.1f}%" if 0.895 <= ratio < 0.9 else f"{100 * ratio:.0f}%"


def verdict(doc: dict[str, Any]) -> list[str]:
    """Per phase: best and worst static ratio (same mix), and the dynamic run against them."""
    lines = []
    for i, phase in enumerate(doc["config"]["phases"]):
        means = static_means(doc, i)
        static = {d: m["req_per_s"] for d, m in means.items()}
        if not static:
            continue
        best, worst = max(static, key=static.__getitem__), min(static, key=static.__getitem__)
        spread = static[best] / static[worst]

        def passes(d: str, means: dict[str, dict[str, Any]] = means) -> str:
            runs = means[d]["passes"]
            return "" if len(runs) < 2 else " (mean of " + " and ".join(
                f"{x:.2f}" for x in runs) + ")"

        line = (f"- phase {i} ({phase['name']}): best static {best} {static[best]:.2f} req/s"
                f"{passes(best)}, worst {worst} {static[worst]:.2f} req/s{passes(worst)} "
                f"({spread:.2f}x)")
        for row in (r for r in doc["rows"] if r["index"] == i and is_dynamic(r["deployment"])):
            d = row["req_per_s"]
            vs_worst, vs_best = d / static[worst], d / static[best]
            goal_worst = ("met" if vs_worst >= 1.6 else "NOT met") if spread >= 1.6 else (
                f"impossible here: best/worst is only {spread:.2f}x")
            line += (f"; {row['deployment']} {d:.2f} req/s = {vs_worst:.2f}x worst (goal >= "
                     f"1.6x: {goal_worst}), {_pct(vs_best)} of best (goal >= 90%: "
                     f"{'met' if vs_best >= 0.9 else 'NOT met'})")
            if "settled_req_per_s" in row:
                line += (f"; second half of the phase {row['settled_req_per_s']:.2f} req/s = "
                         f"{100 * row['settled_req_per_s'] / static[best]:.0f}% of best")
            if "bracket" in row:
                line += _bracketed(doc, i, row)
        lines.append(line)
    return lines


HOST_BAND = 0.15  # host slowdowns within 15 % of each other count as the same host speed


def host_matched(doc: dict[str, Any]) -> list[str]:
    """Each dynamic phase against the passes of the phase's best and worst static ratio
    (by the mean over all passes, as in the verdict) measured at a host slowdown within
    ``HOST_BAND`` of the phase's own: the comparison the host's slow episodes leave
    standing. Rows need ``host_slowdown`` (runs with the gauge)."""
    lines = []
    for i, phase in enumerate(doc["config"]["phases"]):
        means = static_means(doc, i)
        if not means:
            continue
        static = {d: m["req_per_s"] for d, m in means.items()}
        best, worst = max(static, key=static.__getitem__), min(static, key=static.__getitem__)
        passes = [r for r in doc["rows"] if not is_dynamic(r["deployment"])
                  and r.get("mix") == mix(phase) and "host_slowdown" in r]
        for row in (r for r in doc["rows"] if r["index"] == i and is_dynamic(r["deployment"])
                    and "host_slowdown" in r):
            host = row["host_slowdown"]

            def near(d: str, host: float = host,
                     passes: list[dict[str, Any]] = passes) -> list[dict[str, Any]]:
                return [r for r in passes if r["deployment"] == d
                        and abs(r["host_slowdown"] - host) <= HOST_BAND * min(
                            r["host_slowdown"], host)]

            said = []
            for d, goal in ((best, "best"), (worst, "worst")):
                matched = near(d)
                if not matched:
                    said.append(f"no pass of the {goal} ratio {d} at a matching host speed")
                    continue
                ref = sum(r["req_per_s"] for r in matched) / len(matched)
                which = ", ".join(f"pass {r['pass'] + 1} {r['req_per_s']:.2f} at "
                                  f"{r['host_slowdown']:.2f}x" for r in matched)
                share = (f"{_pct(row['req_per_s'] / ref)} of" if goal == "best"
                         else f"{row['req_per_s'] / ref:.2f}x")
                said.append(f"{share} {goal} {d} ({which})")
            lines.append(f"- phase {i} ({phase['name']}), {row['deployment']} "
                         f"{row['req_per_s']:.2f} req/s at host {host:.2f}x: " + "; ".join(said))
    return lines


def _bracketed(doc: dict[str, Any], phase_index: int, row: dict[str, Any]) -> str:
    """A dynamic phase against the static passes right before and after its run."""
    a, b = row["bracket"]
    near = {d: m["req_per_s"] for d, m in static_means(doc, phase_index, (a, b)).items()}
    if not near:
        return ""
    best, worst = max(near, key=near.__getitem__), min(near, key=near.__getitem__)
    d = row["req_per_s"]
    vs_worst, vs_best = d / near[worst], d / near[best]
    spread = near[best] / near[worst]
    goal_worst = ("met" if vs_worst >= 1.6 else "NOT met") if spread >= 1.6 else (
        f"impossible here: best/worst is only {spread:.2f}x")
    return (f" [against the static passes right before and after this run ({a + 1} and "
            f"{b + 1}): best {best} {near[best]:.2f}, worst {worst} {near[worst]:.2f} req/s; "
            f"{vs_worst:.2f}x worst (goal >= 1.6x: {goal_worst}), {_pct(vs_best)} of best "
            f"(goal >= 90%: {'met' if vs_best >= 0.9 else 'NOT met'})]")


def start_ratio(label: str) -> str:
    """The ratio a dynamic run started at (``dynamic_label``)."""
    return label.split(" from ")[1] if " from " in label else "2P2D"


def reaction(doc: dict[str, Any]) -> list[str]:
    """Per dynamic run and phase: how long after the phase began the run served at
    the phase's best static ratio (or one within 5 % of it) for good, from the
    controller's switches, each counted from when its instance serves in the new
    role. Unlike throughput this does not move with the shared machine's load."""
    phase_s = doc["config"]["phase_s"]
    best: dict[int, list[str]] = {}  # the best static ratio, and any within 5 % of it
    for i in range(len(doc["config"]["phases"])):
        rates = {d: m["req_per_s"] for d, m in static_means(doc, i).items()}
        if rates:
            top = max(rates.values())
            best[i] = sorted((d for d in rates if rates[d] >= 0.95 * top),
                             key=lambda d: -rates[d])
    lines = []
    for label in dict.fromkeys(r["deployment"] for r in doc["rows"] if is_dynamic(r["deployment"])):
        n_p, n_d = parse_ratio(start_ratio(label))
        timeline = [(float("-inf"), n_p, n_d)]
        for sw in (w for w in doc.get("switches", []) if w.get("run", "dynamic") == label):
            at = sw.get("healthy_at", sw.get("switched_at"))
            if at is None:
                continue  # never served in its new role
            n_p, n_d = (n_p + 1, n_d - 1) if sw["to_role"] == "prefill" else (n_p - 1, n_d + 1)
            timeline.append((at, n_p, n_d))
        cells = []
        for row in (r for r in doc["rows"] if r["deployment"] == label and "started_at" in r):
            i, begin = row["index"], row["started_at"]
            if i not in best:
                continue
            want, end = best[i], begin + phase_s
            reached = None
            for at, p, d in timeline:
                if at >= end:
                    break
                ok = f"{p}P{d}D" in want
                if ok and reached is None:
                    reached = max(at, begin)
                elif not ok:
                    reached = None
            cells.append(f"phase {i} ({' or '.join(want)}): " + (
                "not reached" if reached is None else f"{reached - begin:.1f} s"))
        if cells:
            lines.append(f"- {label}: " + "; ".join(cells))
    return lines


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["deployment"] for r in doc["rows"]))
    phases = doc["config"]["phases"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        # A static ratio measured each mix once (per pass): its bar, the mean of its
        # passes, stands at every phase of that mix.
        if is_dynamic(label):
            placed = [(r["index"], r) for r in doc["rows"] if r["deployment"] == label]
        else:
            placed = [(i, static_means(doc, i)[label]) for i in range(len(phases))
                      if label in static_means(doc, i)]
        xs = [i + k * width for i, _ in placed]
        rows = [r for _, r in placed]
        axes[0].bar(xs, [r["req_per_s"] for r in rows], width, label=label)
        axes[1].bar(xs, [100 * (r["slo_attainment"] or 0) for r in rows], width, label=label)
    for ax, ylabel in ((axes[0], "throughput (req/s)"), (axes[1], "SLO attainment (%)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))])
        ax.set_xticklabels([f"{i}: {p['name']}" for i, p in enumerate(phases)])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    quota = doc["config"].get("cpu_quota")
    fig.suptitle("E3 tiny, 4 instances" + (f" owning {quota:g} cores each" if quota else "")
                 + ": static P/D ratios" +
                 (" vs controller" if any(map(is_dynamic, labels))
                  else " (dynamic run blocked)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_CPU_GROUPS = ("instances", "router", "tritonserver", "client", "other")


def cpu_table(doc: dict[str, Any]) -> list[str]:
    """Cores per process group (``process_cpu.groups``) per deployment and mix,
    the mean over the rows that measured them (none: no lines)."""
    acc: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in doc["rows"]:
        used = r.get("cpu_cores")
        if used:
            acc.setdefault((r["deployment"], r.get("mix", "")), []).append(
                process_cpu.groups(used))
    if not acc:
        return []
    lines = ["", "Where the CPU went (cores, mean over the rows; instances: all prefill and "
             "decode stubs; router: its stub; client: the load generator; other: the "
             "controller and the host gauge; `perf/experiments/process_cpu.py`):", "",
             "| deployment | mix | " + " | ".join(_CPU_GROUPS) + " | total |",
             "|---|---|" + "---|" * (len(_CPU_GROUPS) + 1)]
    for (label, mix_), rows in acc.items():
        mean = {g: sum(r[g] for r in rows) / len(rows) for g in _CPU_GROUPS}
        lines.append(f"| {label} | {mix_} | " + " | ".join(f"{mean[g]:.2f}" for g in _CPU_GROUPS)
                     + f" | {sum(mean.values()):.2f} |")
    return lines


def _explore_range(gain: float) -> str:
    return (f"gain over {gain:.0%} but within the tolerance" if gain > 0 else
            f"lose less than {-gain:.0%} or gain up to the tolerance")


def pass_note(row: dict[str, Any], passes: int) -> str:
    return f" (pass {row['pass'] + 1})" if passes > 1 and "pass" in row else ""


def markdown(doc: dict[str, Any], figure: str | None) -> str:
    cfg, m, slo = doc["config"], doc["machine"], doc["slo"]
    gauge = doc.get("host_speed") if (doc.get("host_speed") or {}).get("reference_ms") else None
    phases = "; ".join(f"{p['name']} {p['input_len']} in / {p['output_len']} out"
                       for p in cfg["phases"])
    static_s = cfg.get("static_phase_s", cfg["phase_s"])
    quota = cfg.get("cpu_quota")
    owned = "" if quota is None else f", each owning {quota:g} cores (cgroup CPU quota)"
    command = NAME if quota is None else "e3_owned"
    lines = [
        f"## E3: dynamic P/D ratio vs static ratios, 4 tiny instances{owned} — experiments",
        "",
        f"Command: `.venv/bin/python -m perf.experiments.{command}` "
        f"({doc.get('wall_s', 0) / 60:.1f} min)  ",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores shared with other engineers' "
        f"jobs, load average {m['load_average']} before / {doc['machine_after']['load_average']} "
        f"after, {m['date_utc']}.  ",
        f"Phases (closed loop, {cfg['concurrency']} in flight): {phases}. Dynamic run: "
        f"{cfg['phase_s']:.0f} s per phase, in order, starting at "
        f"{' / '.join(cfg.get('starts', ['2P2D']))} (one run each); each static ratio: "
        f"{static_s:.0f} s per distinct mix (a static deployment has nothing that changes "
        "between phases of one mix)"
        + (f", measured {cfg['static_passes']} times (before, between and after the dynamic "
           "runs) and compared as the mean; each dynamic run is also compared with the two "
           "passes right before and after it (in brackets below)" if cfg.get("interleave")
           else f", measured {cfg['static_passes']} times (before and after the dynamic runs) "
           "and compared as the mean" if cfg.get("static_passes", 1) > 1 else "")
        + ". Every deployment is warmed up (each mix, unmeasured) "
        f"first. {cfg['slots']} slots per instance (prefill slots / decode batch); instances "
        "alternate over the 2 cores; router unpinned"
        + ("." if quota is None else
           f"; each instance may use {quota:g} cores of CPU time (`cpu_quota`: a cgroup of its "
           "own, 10 ms periods), as if it owned a device, so a ratio moves compute between the "
           f"stages; the {2 - 4 * quota:g} cores left are the router's, the client's and the "
           "controller's; the compute check sees each instance's quota as its own unit.")
        + "  ",
        f"Controller (`pdserve controller {' '.join(doc.get('controller_args', []))}`): "
        f"ratio window {cfg['ratio_interval_s']:g} s, cool-down {cfg['ratio_cooldown_s']:g} s "
        "after a switch, drain first (switch when idle or after the drain timeout), "
        "heartbeats every probe interval, which also sample each stage's busy slots for the "
        "balance rule (utilisation = busy share of the slots, Little's law"
        + ("; with owned compute, each stage's CPU time over its quotas instead"
           if quota is not None else "") + "); no switch while "
        f"the busier stage is below {cfg.get('ratio_min_peak', 0):g} busy; online trigger "
        f"on E2E up {cfg.get('ratio_e2e_rise', 1.25):g}x with the TTFT share moving by "
        f"{cfg.get('ratio_share_delta', 0.05):g}; "
        + (f"a mix that returns within {cfg['ratio_recall_s']:g} s goes to the ratio that did "
           "best with it (recall); " if cfg.get("ratio_recall_s") else "")
        + (f"a switch predicted to {_explore_range(cfg['ratio_explore_gain'])} is tried where "
           "its ratio was not measured with the mix, and undone if it measures worse "
           "(explore); " if cfg.get("ratio_explore_gain") else "")
        + (f"one decision moves up to {cfg['ratio_max_step']} instances, drained and switched "
           "side by side; " if cfg.get("ratio_max_step", 1) > 1 else "")
        + (f"after a window of a changing mix the next one lasts "
           f"{cfg['ratio_mix_window_s']:g} s; " if cfg.get("ratio_mix_window_s") else "")
        + ("compute check: no switch that gives a stage whose cores are "
           f"{doc['compute_busy']:.0%} busy (heartbeat counters) no core with room; "
           if doc.get("compute_busy") else "slots only (no compute check); ")
        + "Triton polls the repository every 1 s.  ",
        f"SLOs: TTFT <= {slo['ttft_ms']:.0f} ms and TPOT <= {slo['tpot_ms']:.0f} ms "
        "(attainment = requests meeting both / finished requests).",
        "",
        "| deployment | phase | req/s (whole phase) | req/s (second half) | out tok/s | "
        "TTFT p50/p99 ms | TPOT p50 ms | attainment |" + (" host slowdown |" if gauge else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if gauge else ""),
    ]
    for r in doc["rows"]:
        settled = r.get("settled_req_per_s")
        slow = r.get("host_slowdown")
        lines.append(
            f"| {r['deployment']}{pass_note(r, cfg.get('static_passes', 1))} | "
            f"{r['index']}: {r['phase']} | {r['req_per_s']:.2f} | "
            f"{common.fmt(settled, '.2f')} | {r['out_tok_per_s']:.0f} | "
            f"{common.fmt(r['ttft_p50_ms'])}/{common.fmt(r['ttft_p99_ms'])} | "
            f"{common.fmt(r['tpot_p50_ms'])} | {common.pct(r['slo_attainment'])} |"
            + ("" if not gauge else " – |" if slow is None else f" {slow:.2f}x |"))
    if gauge:
        lines += ["", "Host slowdown: how much slower than its fastest the host ran a fixed "
                  "piece of CPU work during the row (median of one sample a second, thread CPU "
                  "time, so the experiment's own load does not count; "
                  f"`perf/experiments/host_speed.py`; unslowed {gauge['reference_ms']:.2f} ms, "
                  f"{gauge['samples']} samples). Rows measured above ~1.2x met a slowed host."]
    lines += cpu_table(doc)
    lines += ["", "Goal: >= 1.6x the worst static ratio and >= 90% of the best, per phase, "
              "on whole-phase throughput (where best/worst < 1.6x, 1.6x worst is impossible "
              "and is said so):", *doc["verdict"]]
    matched = host_matched(doc)
    if matched:
        lines += ["", "The same against only the static passes measured at a host speed within "
                  f"{HOST_BAND:.0%} of the dynamic phase's (host slowdown column above; not the "
                  "goal's headline, which is the mean over all passes):", *matched]
    if took := reaction(doc):
        lines += ["", "Time from each phase's start until the dynamic run served at that "
                  "phase's best static ratio (or one within 5 % of it) for the rest of the "
                  "phase (from the switches "
                  "below; not moved by the machine's load as throughput is):", *took]
    switches = doc.get("switches", [])
    if "controller_edits" in doc:
        starts = {label: min((r["started_at"] for r in doc["rows"]
                              if r["deployment"] == label and "started_at" in r), default=None)
                  for label in {r["deployment"] for r in doc["rows"]} if is_dynamic(label)}
        lines += ["", f"Role switches during the dynamic runs: {len(switches)}" + (
            " — none, so each dynamic run measured its start ratio with the controller watching."
            if not switches else " (cost = drain, then the switch until the instance serves "
            "in its new role: in place, the drain is lifted once routers heard the new role; "
            "through the repository, Triton reloads it and it serves nothing meanwhile):")]
        if switches:
            lines += ["", "| run | instance | to | how | began (s into the run) | drain s | "
                      "switch s | total s | why |", "|---|---|---|---|---|---|---|---|---|"]
            for sw in switches:
                run_ = sw.get("run", "dynamic")
                start = starts.get(run_)
                began = f"{sw['drain_at'] - start:.1f}" if start is not None else "–"
                lines.append(f"| {run_} | {sw['instance']} | {sw['to_role']} | "
                             f"{sw.get('how', 'reload')} | {began} | "
                             f"{common.fmt(sw.get('drain_s'))} | "
                             f"{common.fmt(sw.get('reload_s'))} | "
                             f"{common.fmt(sw.get('total_s'))} | {sw.get('reason', '')} |")
        edits = [json.loads(e) for e in doc["controller_edits"] if e.strip()]
        if edits:
            lines += ["", "Repository edits (the reload run's switches):"]
            lines += [f"- {e.get('kind')} {e.get('model')}: {e.get('reason')}" for e in edits]
    said = [d for d in doc.get("decisions", []) if d["action"] == "none"
            and "compute saturated" in d["reason"]]
    if said:
        lines += ["", "Switches the compute check refused (the controller logs each new kind "
                  "of decision once):", ""]
        lines += [f"- {d['run']}, {d['ratio']}: {d['reason']}" for d in said]
    order = ("first, before the three static servers" if cfg.get("dynamic_first")
             else "each between two passes of the three static servers"
             if cfg.get("interleave")
             else "between the two passes of the three static servers"
             if cfg.get("static_passes", 1) > 1 else "last, after the three static servers")
    lines += ["", f"Caveats: the dynamic runs go {order}, so they "
              "meet whatever load the shared machine carries then (load average above); the "
              "whole-phase figure includes the controller's reaction (a ratio window, the "
              "drain, the switch) after each shift."]
    deaths = doc.get("server_deaths", [])
    if deaths:
        lines += ["", f"tritonserver died {len(deaths)} time(s) during the run; each time the "
                  "deployment was measured again on a fresh server and only that measurement "
                  "counts:", ""]
        lines += [f"- {d['what']}: {d['error']}" for d in deaths]
    if doc["dynamic_blockers"]:
        lines += ["", "**Dynamic (controller) run: blocked**, not measured:"]
        lines += [f"- {b}" for b in doc["dynamic_blockers"]]
    if figure:
        lines += ["", f"![E3]({figure})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, key="e3", name=NAME, description=__doc__.split("\n")[0],
                       quick_help="2 short phases", plot=plot, markdown=markdown,
                       run=lambda args: run(QUICK if args.quick else FULL, args.quick, args.out))

if __name__ == "__main__":
    raise SystemExit(main())
