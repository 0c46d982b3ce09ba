"""Does a decode made by a role switch in place serve as fast as one built at start?

E3's output-heavy mix (16 in / 160 out, closed loop of 16, ``seconds`` per
measurement) on the `tiny` instances E3 uses, with the state file written the
way the controller writes it (drain, ``set_role``, ``acting_role``, lift):

    roundtrip   one static 1P3D server: measure; switch decode_2 to prefill and
                back in place; measure again (``rounds`` times)
    vs-static   alternately a fresh static 1P3D server, and a 2P2D server whose
                prefill_0 is switched to decode in place (``rounds`` each)

    python -m perf.switch_in_place roundtrip|vs-static [--rounds 2] [--seconds 20]

Prints one line per measurement (req/s, TTFT p50/p99, TPOT p50). Figures on the
shared 2 cores move by 10-30% between minutes: compare within a mode's rounds.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

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
from perf.experiments import common
from perf.experiments import e3_dynamic_ratio as e3

CFG = e3.FULL
OUTPUT_HEAVY = CFG.phases[1]
OWNER = "controller"


def measure(server: TritonServer, label: str, seed: int, seconds: float) -> float:
    reqs = list(itertools.islice(e3.phase_requests(OUTPUT_HEAVY, seed), 100_000))
    run = common.drive(server, reqs, label=label, concurrency=CFG.concurrency,
                       max_duration_s=seconds, request_timeout_s=60)
    row = common.summary_row(run.summary(Slo(ttft_ms=CFG.slo_ttft_ms, tpot_ms=CFG.slo_tpot_ms)))
    print(f"{label}: {row['req_per_s']:.2f} req/s, TTFT p50/p99 {row['ttft_p50_ms']:.0f}/"
          f"{row['ttft_p99_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms']:.1f} ms", flush=True)
    return float(row["req_per_s"])


def switch(server: TritonServer, name: str, roles: tuple[str, ...], acting: str) -> None:
    """Drain ``name``, switch it through ``roles`` in place, publish ``acting``
    (the role it serves, "" for its home role) and lift the drain."""
    state = default_state_path(server.options.repository)
    update_state(state, lambda s: with_drain(s, name, DrainRequest(OWNER, "probe", time.time())))
    time.sleep(1.5)  # routers' heartbeats see the drain; nothing was in flight there
    client = TritonProbeClient()
    for role in roles:
        result = client.set_role(server.options.http_url, name, role)
        if not result.ok:
            raise RuntimeError(f"set_role {role} on {name}: {result.error}")
    if acting:
        status = InstanceStatus(role=acting, scenario="default", state="healthy",
                                routable=True, acting_role=acting)
        update_state(state, lambda s: ControllerState(time.time(), {**s.instances, name: status},
                                                      s.ratios, s.draining))
        time.sleep(1.0)  # every router's next heartbeat answers in the new role
    update_state(state, lambda s: without_drain(s, name, OWNER))
    time.sleep(1.0)


def roundtrip(workdir: Path, rounds: int, seconds: float) -> None:
    with common.deployed(e3.spec(CFG, 1, 3), workdir / "roundtrip", poll_secs=1) as server:
        e3.warmup(server, CFG)
        for r in range(rounds):
            measure(server, f"static 1P3D, round {r}", 20 + r, seconds)
            switch(server, "decode_2", ("prefill", "decode"), acting="")
            measure(server, f"same server after decode_2 -> prefill -> decode, round {r}",
                    30 + r, seconds)


def vs_static(workdir: Path, rounds: int, seconds: float) -> None:
    for r in range(rounds):
        with common.deployed(e3.spec(CFG, 1, 3), workdir / f"static{r}") as server:
            e3.warmup(server, CFG)
            measure(server, f"static 1P3D, round {r}", 10 + r, seconds)
        with common.deployed(e3.spec(CFG, 2, 2), workdir / f"live{r}", poll_secs=1) as server:
            e3.warmup(server, CFG)
            switch(server, "prefill_0", ("decode",), acting="decode")
            measure(server, f"2P2D with prefill_0 switched to decode in place, round {r}",
                    10 + r, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("roundtrip", "vs-static"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdserve-switch-") as tmp:
        run = roundtrip if args.mode == "roundtrip" else vs_static
        run(Path(tmp), args.rounds, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
