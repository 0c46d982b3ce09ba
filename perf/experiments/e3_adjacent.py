"""E3 with static references next to each dynamic phase, on the same server.

E3 compares the controller's run with static ratios measured on other servers
minutes away; on the shared 2-core box the same ratio measured minutes apart
moved by up to 1.43x (RESULTS.md, E3), more than the ratios differ. Here the
references are taken on the dynamic run's own server, right before and right
after each of its phases (``--no-bracket``: after only): the controller is
stopped, the instances are switched in place to each static ratio in turn (a
switch in place serves as fast as a static deployment:
``perf.switch_in_place``), ``ref_s`` of the phase's mix is measured at each,
the roles that were serving are put back, and a fresh controller runs the
phase (it takes the roles switched in place over from the heartbeats). A
phase is compared with the mean of its references before and after, so a
drift of the machine's speed across the phase weighs on both sides alike. The
static ratios keep E3's spread: each stage's instances cover both cores where
they can. ``--repeat N`` runs the whole thing N times, each on a fresh server,
and summarises each phase over the runs (median).

    python -m perf.experiments.e3_adjacent [--ref-s 20] [--start 1P3D] [--repeat N] [--owned]
        [--out DIR]

Writes ``e3_adjacent.json`` (rows in E3's shape; reference rows carry
``reference_for`` and ``reference_when``) per run and prints the verdict per
phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import Slo
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.controller.state import (
    ControllerState,
    DrainRequest,
    InstanceStatus,
    default_state_path,
    update_state,
    with_drain,
    without_drain,
)
from pdserve.server.launcher import TritonServer
from pdserve.server.repo import instances_from_spec
from perf.experiments import common, e3_owned
from perf.experiments import e3_dynamic_ratio as e3

OWNER = "controller"  # the drains a controller would set


def spread_roles(cores: Mapping[str, int], homes: Mapping[str, str],
                 n_prefill: int) -> dict[str, str]:
    """Roles for ``n_prefill`` prefills that spread each stage over the cores:
    instances taken alternately from each core (home prefills first within a
    core, then by name), the first ``n_prefill`` prefill, the rest decode."""
    by_core: dict[int, list[str]] = {}
    for name in sorted(cores, key=lambda n: (homes[n] != "prefill", n)):
        by_core.setdefault(cores[name], []).append(name)
    order: list[str] = []
    queues = [by_core[c] for c in sorted(by_core)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return {name: "prefill" if k < n_prefill else "decode" for k, name in enumerate(order)}


def flips(now: Mapping[str, str], target: Mapping[str, str]) -> list[tuple[str, str]]:
    """(instance, new role) to go from ``now`` to ``target`` one switch at a time,
    never leaving a stage empty: a flip into the stage with fewer instances first."""
    todo = sorted((n, r) for n, r in target.items() if now[n] != r)
    roles = dict(now)
    out = []
    while todo:
        count = {r: sum(1 for v in roles.values() if v == r) for r in ("prefill", "decode")}
        todo.sort(key=lambda f: (count[f[1]], f[0]))
        name, role = todo.pop(0)
        out.append((name, role))
        roles[name] = role
    return out


def served_roles(server: TritonServer, names: list[str]) -> dict[str, str]:
    client = TritonProbeClient()
    try:
        out = {}
        for name in names:
            result = client.probe(server.options.http_url, name)
            if result.load is None:
                raise RuntimeError(f"{name} did not answer its heartbeat: {result.error}")
            out[name] = result.load.role
        return out
    finally:
        client.close()


def switch_to(server: TritonServer, name: str, role: str, home: str,
              timeout_s: float = 20.0) -> None:
    """Drain ``name``, switch it to ``role`` in place (retrying while requests a
    cancelled run left finish), publish the role for the routers, lift the drain."""
    state = default_state_path(server.options.repository)
    drain = DrainRequest(OWNER, "reference", time.time())
    update_state(state, lambda s: with_drain(s, name, drain))
    time.sleep(1.5)  # routers' heartbeats see the drain
    client = TritonProbeClient()
    try:
        deadline = time.monotonic() + timeout_s
        while not (result := client.set_role(server.options.http_url, name, role)).ok:
            if time.monotonic() > deadline:
                raise RuntimeError(f"set_role {role} on {name}: {result.error}")
            time.sleep(0.5)
    finally:
        client.close()
    acting = "" if role == home else role
    status = InstanceStatus(role=role, scenario="default", state="healthy", routable=True,
                            acting_role=acting)
    update_state(state, lambda s: ControllerState(time.time(), {**s.instances, name: status},
                                                  s.ratios, s.draining))
    time.sleep(1.0)  # every router's next heartbeat answers in the new role
    update_state(state, lambda s: without_drain(s, name, OWNER))
    time.sleep(0.5)


def set_roles(server: TritonServer, target: Mapping[str, str], homes: Mapping[str, str]) -> None:
    now = served_roles(server, sorted(target))
    for name, role in flips(now, target):
        switch_to(server, name, role, homes[name])


def references(server: TritonServer, cfg: e3.E3Config, cores: Mapping[str, int],
               homes: Mapping[str, str], index: int, phase: e3.Phase, ref_s: float,
               label: str, when: str, slo: Slo) -> list[dict[str, Any]]:
    """Each static ratio in turn, ``ref_s`` of the phase's mix, then the roles
    that were serving put back."""
    kept = served_roles(server, sorted(homes))
    rows: list[dict[str, Any]] = []
    for n_p, _ in e3.STATIC:
        set_roles(server, spread_roles(cores, homes, n_p), homes)
        rows += [dict(r, reference_for=label, reference_when=when)
                 for r in e3.run_phases(server, cfg, f"{n_p}P{4 - n_p}D", slo,
                                        [(index, phase)], ref_s)]
    set_roles(server, kept, homes)
    return rows


def run(cfg: e3.E3Config, start: str, ref_s: float, out: Path,
        bracket: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    slo = Slo(ttft_ms=cfg.slo_ttft_ms, tpot_ms=cfg.slo_tpot_ms)
    spec = e3.spec(cfg, *e3.parse_ratio(start))
    instances = [c for c in instances_from_spec(spec) if c.role in ("prefill", "decode")]
    homes = {c.name: c.role for c in instances}
    cores = {c.name: (c.cpu_cores or (0,))[0] for c in instances}
    label = e3.dynamic_label("live", start)
    doc: dict[str, Any] = {"experiment": "e3_adjacent",
                           "config": {**asdict(cfg), "ref_s": ref_s, "start": start,
                                      "bracket": bracket},
                           "controller_args": e3.controller_args(cfg), "slo": slo.__dict__,
                           "machine": common.machine(), "rows": [], "switches": []}
    with common.deployed(spec, out / "server", poll_secs=1) as server:
        e3.warmup(server, cfg)
        for i, phase in enumerate(cfg.phases):
            if bracket:
                doc["rows"] += references(server, cfg, cores, homes, i, phase, ref_s, label,
                                          "before", slo)
            workdir = out / f"phase{i}"
            workdir.mkdir(exist_ok=True)
            with e3.controller(server, cfg, workdir, "live"):
                doc["rows"] += e3.run_phases(server, cfg, label, slo, [(i, phase)], cfg.phase_s)
            # A switch the stopped controller had begun leaves its drain behind.
            update_state(default_state_path(server.options.repository), lambda s: ControllerState(
                s.updated_at, {n: replace(st, state="healthy", routable=True)
                               for n, st in s.instances.items()}, s.ratios, {}))
            log = workdir / "controller.log"
            text = log.read_text() if log.exists() else ""
            doc["switches"] += [dict(sw, phase=i) for sw in e3.switch_costs(text)]
            doc["rows"] += references(server, cfg, cores, homes, i, phase, ref_s, label,
                                      "after", slo)
    doc["machine_after"] = common.machine()
    doc["wall_s"] = time.monotonic() - began
    doc["verdict"] = verdict(doc)
    common.write_json(out / "e3_adjacent.json", doc)
    return doc


def phase_figures(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per dynamic phase: its req/s and each static ratio's reference on the
    same server (the mean of the references taken before and after it)."""
    out = []
    for row in (r for r in doc["rows"] if e3.is_dynamic(r["deployment"])):
        taken: dict[str, list[float]] = {}
        for r in doc["rows"]:
            if r.get("reference_for") == row["deployment"] and r["index"] == row["index"]:
                taken.setdefault(r["deployment"], []).append(r["req_per_s"])
        if not taken:
            continue
        refs = {dep: sum(v) / len(v) for dep, v in taken.items()}
        best = max(refs, key=refs.__getitem__)
        worst = min(refs, key=refs.__getitem__)
        out.append({"index": row["index"], "phase": row["phase"],
                    "deployment": row["deployment"], "req_per_s": row["req_per_s"],
                    "refs": refs, "passes": max(len(v) for v in taken.values()),
                    "best": best, "worst": worst,
                    "of_best": row["req_per_s"] / refs[best],
                    "of_worst": row["req_per_s"] / refs[worst],
                    "spread": refs[best] / refs[worst]})
    return out


def verdict(doc: dict[str, Any]) -> list[str]:
    """Per phase: the dynamic run against the references taken next to it."""
    lines = []
    for f in phase_figures(doc):
        goal_worst = ("met" if f["of_worst"] >= 1.6 else "NOT met") if f["spread"] >= 1.6 else (
            f"impossible here: best/worst is only {f['spread']:.2f}x")
        taken = "mean of before and after" if f["passes"] > 1 else "right after it"
        lines.append(
            f"- phase {f['index']} ({f['phase']}): {f['deployment']} {f['req_per_s']:.2f} "
            f"req/s; on the same server ({taken}): best {f['best']} {f['refs'][f['best']]:.2f}, "
            f"worst {f['worst']} {f['refs'][f['worst']]:.2f} req/s; "
            f"{100 * f['of_best']:.0f}% of best (goal >= 90%: "
            f"{'met' if f['of_best'] >= 0.9 else 'NOT met'}), {f['of_worst']:.2f}x worst "
            f"(goal >= 1.6x: {goal_worst})")
    return lines


def summary(docs: list[dict[str, Any]]) -> list[str]:
    """Each phase over repeated runs: the dynamic run's share of the best
    reference in each run, its median, and how many runs met 90%."""
    by_phase: dict[int, list[dict[str, Any]]] = {}
    for doc in docs:
        for f in phase_figures(doc):
            by_phase.setdefault(f["index"], []).append(f)
    lines = []
    for index in sorted(by_phase):
        figs = by_phase[index]
        shares = [f["of_best"] for f in figs]
        n = len(shares)
        median = statistics.median(shares)
        met = sum(1 for s in shares if s >= 0.9)
        spreads = ", ".join(f"{f['spread']:.2f}x" for f in figs)
        each = ", ".join(f"{100 * f['of_best']:.0f}%" for f in figs)
        lines.append(
            f"- phase {index} ({figs[0]['phase']}): "
            f"{each} of the best reference "
            f"in {n} run(s); median {100 * median:.0f}% (goal >= 90%: "
            f"{'met' if median >= 0.9 else 'NOT met'}); >= 90% in {met} of {n}; "
            f"best/worst reference {spreads}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-s", type=float, default=20.0)
    parser.add_argument("--start", default="1P3D")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh server")
    parser.add_argument("--no-bracket", action="store_true",
                        help="references after each phase only (not also before)")
    parser.add_argument("--owned", action="store_true",
                        help="E3 with owned compute (perf.experiments.e3_owned: each instance "
                             "its own CPU quota, 120 s phases)")
    parser.add_argument("--out", type=Path, default=Path("perf/out/e3_adjacent"))
    args = parser.parse_args(argv)
    cfg = e3_owned.FULL if args.owned else e3.FULL
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    docs = []
    for k in range(args.repeat):
        out = args.out if args.repeat == 1 else args.out / f"run{k}"
        doc = run(cfg, args.start, args.ref_s, out, bracket=not args.no_bracket)
        docs.append(doc)
        print("\n".join(doc["verdict"]))
        print(json.dumps({"run": k, "wall_s": round(doc["wall_s"]),
                          "switches": len(doc["switches"])}), flush=True)
    if args.repeat > 1:
        lines = summary(docs)
        print("\n".join(lines))
        common.write_json(args.out / "summary.json", {"summary": lines,
                                                      "runs": [f"run{k}" for k in
                                                               range(args.repeat)]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
