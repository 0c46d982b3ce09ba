"""E3: dynamic P/D ratio (the controller) vs each static ratio on 4 `tiny` instances.

Traffic shifts like day and night between two phases, each a closed loop of
``concurrency`` requests for ``phase_s`` seconds:
  prompt-heavy  long prompts, a few output tokens   (wants prefill instances)
  output-heavy  short prompts, long outputs         (wants decode instances)
Each static ratio (1P3D, 2P2D, 3P1D) gets its own tritonserver and both
phases; the dynamic run starts at 2P2D with ``pdserve controller`` watching the
repository and switching instance roles. Per phase: request and output-token
throughput and SLO attainment (TTFT and TPOT SLOs below).

Instances alternate between the two cores (prefill_i on core i%2, decode_i on
core (i+1)%2) so every ratio spreads its instances 2/2 over the cores, and each
holds ``slots`` requests (prefill slots / decode batch), which is what a
ratio trades: 1P3D has 4 prompt slots and 12 decode slots, 3P1D the reverse.

    python -m perf.experiments.e3_dynamic_ratio [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import Slo
from pdserve.bench.records import RequestSpec
from pdserve.bench.workload import LengthDistribution, iter_synthetic_requests
from pdserve.scheduler.controller.protocol import CONTROL_INPUT
from pdserve.server import config as server_config
from pdserve.server.config import InstanceConfig
from pdserve.server.launcher import TritonServer, free_port
from pdserve.server.repo import config_pbtxt
from perf.experiments import common

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
    phase_s: float
    slots: int
    slo_ttft_ms: float
    slo_tpot_ms: float
    ratio_interval_s: float  # controller: how often it re-decides the ratio
    ratio_cooldown_s: float

    def __post_init__(self) -> None:
        if not self.phases or self.phase_s <= 0 or self.concurrency < 1 or self.slots < 1:
            raise ValueError("need phases, phase_s > 0, concurrency >= 1 and slots >= 1")


FULL = E3Config(phases=(Phase("prompt-heavy", 900, 4), Phase("output-heavy", 16, 160),
                        Phase("prompt-heavy", 900, 4)),
                concurrency=16, phase_s=25.0, slots=4, slo_ttft_ms=500.0, slo_tpot_ms=50.0,
                ratio_interval_s=3.0, ratio_cooldown_s=6.0)
QUICK = replace(FULL, phases=FULL.phases[:2], phase_s=5.0)


def spec(cfg: E3Config, n_prefill: int, n_decode: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "router": {"name": "pdserve", "num_threads": 1},
        "limits": {"max_tokens": 256, "max_batch_size": cfg.slots, "kv_capacity_mb": 64,
                   "ttft_budget_s": 60},
        "kv": {"transport": "shm", "send_mode": "whole", "ttl_s": 30},
        "scenarios": {"default": {"prefill": n_prefill, "decode": n_decode,
                                  "cpu_cores": {"prefill": ["0", "1"], "decode": ["1", "0"]}}},
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


def run_phases(server: TritonServer, cfg: E3Config, label: str, slo: Slo
               ) -> list[dict[str, Any]]:
    rows = []
    for i, phase in enumerate(cfg.phases):
        run_ = common.drive(server, list(itertools.islice(phase_requests(phase, i), 100_000)),
                            label=label, concurrency=cfg.concurrency,
                            max_duration_s=cfg.phase_s, request_timeout_s=60)
        row = {"deployment": label, "phase": phase.name, "index": i,
               **common.summary_row(run_.summary(slo))}
        rows.append(row)
        print(f"{label} phase {i} {phase.name}: {row['req_per_s']:.2f} req/s "
              f"{row['out_tok_per_s']:.0f} tok/s att {row['slo_attainment']}", flush=True)
    return rows


@contextlib.contextmanager
def controller(server: TritonServer, cfg: E3Config, workdir: Path) -> Iterator[Path]:
    """``pdserve controller`` on the server's repository; always stopped."""
    o = server.options
    log = workdir / "controller.log"
    edits = workdir / "edits.jsonl"
    cmd = [sys.executable, "-m", "pdserve.cli", "controller", "--repository",
           str(o.repository), "--server", f"{o.host}:{o.http_port}:{o.metrics_port}",
           "--probe-interval-s", "1", "--ratio-interval-s", str(cfg.ratio_interval_s),
           "--ratio-cooldown-s", str(cfg.ratio_cooldown_s), "--drain-timeout-s", "10",
           "--metrics-port", str(free_port()), "--edit-log", str(edits)]
    with open(log, "ab") as out:
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


def run(cfg: E3Config, quick: bool, out: Path | None = None) -> dict[str, Any]:
    out = out or common.out_dir(NAME, quick)
    out.mkdir(parents=True, exist_ok=True)
    slo = Slo(ttft_ms=cfg.slo_ttft_ms, tpot_ms=cfg.slo_tpot_ms)
    doc: dict[str, Any] = {"experiment": NAME, "quick": quick, "config": asdict(cfg),
                           "slo": slo.__dict__, "machine": common.machine(), "rows": []}
    for n_p, n_d in STATIC:
        label = f"{n_p}P{n_d}D"
        with common.deployed(spec(cfg, n_p, n_d), out / label) as server:
            common.drive(server, list(itertools.islice(phase_requests(cfg.phases[0], 99), 8)),
                         label="warmup", concurrency=4)
            doc["rows"] += run_phases(server, cfg, label, slo)
    blockers = dynamic_blockers()
    doc["dynamic_blockers"] = blockers
    if not blockers:
        # Poll every second so a role switch the controller writes is loaded soon.
        with common.deployed(spec(cfg, 2, 2), out / "dynamic", poll_secs=1) as server, \
                controller(server, cfg, out / "dynamic") as edits:
            doc["rows"] += run_phases(server, cfg, "dynamic", slo)
            doc["controller_edits"] = edits.read_text().splitlines() if edits.exists() else []
    doc["machine_after"] = common.machine()
    doc["verdict"] = verdict(doc)
    common.write_json(out / "e3.json", doc)
    doc["png"] = str(plot(doc, out / "e3.png"))
    return doc


def verdict(doc: dict[str, Any]) -> list[str]:
    """Per phase: best and worst static ratio, and the dynamic run against them."""
    lines = []
    for i, phase in enumerate(doc["config"]["phases"]):
        static = {r["deployment"]: r["req_per_s"] for r in doc["rows"]
                  if r["index"] == i and r["deployment"] != "dynamic"}
        best, worst = max(static, key=static.__getitem__), min(static, key=static.__getitem__)
        line = (f"- phase {i} ({phase['name']}): best static {best} {static[best]:.2f} req/s, "
                f"worst {worst} {static[worst]:.2f} req/s ({static[best] / static[worst]:.2f}x)")
        dyn = [r for r in doc["rows"] if r["index"] == i and r["deployment"] == "dynamic"]
        if dyn:
            d = dyn[0]["req_per_s"]
            line += (f"; dynamic {d:.2f} req/s = {d / static[worst]:.2f}x worst (goal >= 1.6), "
                     f"{100 * d / static[best]:.0f}% of best (goal >= 90%)")
        lines.append(line)
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
        rows = sorted((r for r in doc["rows"] if r["deployment"] == label),
                      key=lambda r: r["index"])
        xs = [r["index"] + k * width for r in rows]
        axes[0].bar(xs, [r["req_per_s"] for r in rows], width, label=label)
        axes[1].bar(xs, [100 * (r["slo_attainment"] or 0) for r in rows], width, label=label)
    for ax, ylabel in ((axes[0], "throughput (req/s)"), (axes[1], "SLO attainment (%)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))])
        ax.set_xticklabels([f"{i}: {p['name']}" for i, p in enumerate(phases)])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("E3 tiny, 4 instances: static P/D ratios" +
                 (" vs controller" if "dynamic" in labels else " (dynamic run blocked)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(doc: dict[str, Any], figure: str | None) -> str:
    cfg, m, slo = doc["config"], doc["machine"], doc["slo"]
    phases = "; ".join(f"{p['name']} {p['input_len']} in / {p['output_len']} out"
                       for p in cfg["phases"])
    lines = [
        "## E3: dynamic P/D ratio vs static ratios, 4 tiny instances — experiments",
        "",
        f"Command: `.venv/bin/python -m perf.experiments.{NAME}`  ",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores shared with other engineers' "
        f"jobs, load average {m['load_average']} before / {doc['machine_after']['load_average']} "
        f"after, {m['date_utc']}.  ",
        f"Phases (closed loop, {cfg['concurrency']} in flight, {cfg['phase_s']:.0f} s each): "
        f"{phases}. {cfg['slots']} slots per instance (prefill slots / decode batch); instances "
        "alternate over the 2 cores; router unpinned.  ",
        f"SLOs: TTFT <= {slo['ttft_ms']:.0f} ms and TPOT <= {slo['tpot_ms']:.0f} ms "
        "(attainment = requests meeting both / finished requests).",
        "",
        "| deployment | phase | req/s | out tok/s | TTFT p50/p99 ms | TPOT p50 ms | attainment |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['deployment']} | {r['index']}: {r['phase']} | {r['req_per_s']:.2f} | "
            f"{r['out_tok_per_s']:.0f} | {common.fmt(r['ttft_p50_ms'])}/"
            f"{common.fmt(r['ttft_p99_ms'])} | {common.fmt(r['tpot_p50_ms'])} | "
            f"{common.pct(r['slo_attainment'])} |")
    lines += ["", *doc["verdict"], "",
              "Caveats: the dynamic run goes last, after the three static servers, so it meets "
              "whatever load the shared machine carries then (load average above); each role "
              "switch drains the instance, then Triton (polling every 1 s) reloads it, and it "
              "serves nothing meanwhile; the controller probes every instance each second. "
              "Phase boundaries are abrupt and 25 s long, so the controller's reaction time "
              "(ratio interval, cool-down, drain) is a large part of each phase."]
    if "controller_edits" in doc:
        edits = [json.loads(e) for e in doc["controller_edits"] if e.strip()]
        lines += ["", f"Controller edits during the dynamic run: {len(edits)}" + (
            " — it switched no role, so the dynamic run measured 2P2D with the controller "
            "watching." if not edits else ":")]
        lines += [f"- {e.get('kind')} {e.get('model')}: {e.get('reason')} {e.get('changes')}"
                  for e in edits]
    if doc["dynamic_blockers"]:
        lines += ["", "**Dynamic (controller) run: blocked**, not measured:"]
        lines += [f"- {b}" for b in doc["dynamic_blockers"]]
    if figure:
        lines += ["", f"![E3]({figure})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 short phases")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--out", type=Path, help="output dir (default perf/out/<experiment>)")
    parser.add_argument("--from-json", type=Path,
                        help="re-render RESULTS.md and the PNG from an earlier run's e3.json")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.from_json:
        doc = common.rerender(args.from_json, plot)
    else:
        doc = run(cfg, args.quick, args.out)
    return common.publish(doc, "e3", NAME, markdown, quick=args.quick,
                          no_results=args.no_results)


if __name__ == "__main__":
    raise SystemExit(main())
