"""Does a decode made by a role switch in place serve as fast as one built at start?

E3's output-heavy mix (16 in / 160 out, closed loop of 16, ``seconds`` per
measurement) on the `tiny` instances E3 uses, with the state file written the
way the controller writes it (drain, ``set_role``, ``acting_role``, lift;
``e3_adjacent.switch_to``):

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
from pathlib import Path

from pdserve.bench.metrics import Slo
from pdserve.server.launcher import TritonServer
from perf.experiments import common
from perf.experiments import e3_dynamic_ratio as e3
from perf.experiments.e3_adjacent import switch_to

CFG = e3.FULL
OUTPUT_HEAVY = CFG.phases[1]


def measure(server: TritonServer, label: str, seed: int, seconds: float) -> float:
    reqs = list(itertools.islice(e3.phase_requests(OUTPUT_HEAVY, seed), 100_000))
    run = common.drive(server, reqs, label=label, concurrency=CFG.concurrency,
                       max_duration_s=seconds, request_timeout_s=60)
    row = common.summary_row(run.summary(Slo(ttft_ms=CFG.slo_ttft_ms, tpot_ms=CFG.slo_tpot_ms)))
    print(f"{label}: {row['req_per_s']:.2f} req/s, TTFT p50/p99 {row['ttft_p50_ms']:.0f}/"
          f"{row['ttft_p99_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms']:.1f} ms", flush=True)
    return float(row["req_per_s"])


def roundtrip(workdir: Path, rounds: int, seconds: float) -> None:
    with common.deployed(e3.spec(CFG, 1, 3), workdir / "roundtrip", poll_secs=1) as server:
        e3.warmup(server, CFG)
        for r in range(rounds):
            measure(server, f"static 1P3D, round {r}", 20 + r, seconds)
            switch_to(server, "decode_2", "prefill", home="decode")
            switch_to(server, "decode_2", "decode", home="decode")
            measure(server, f"same server after decode_2 -> prefill -> decode, round {r}",
                    30 + r, seconds)


def vs_static(workdir: Path, rounds: int, seconds: float) -> None:
    for r in range(rounds):
        with common.deployed(e3.spec(CFG, 1, 3), workdir / f"static{r}") as server:
            e3.warmup(server, CFG)
            measure(server, f"static 1P3D, round {r}", 10 + r, seconds)
        with common.deployed(e3.spec(CFG, 2, 2), workdir / f"live{r}", poll_secs=1) as server:
            e3.warmup(server, CFG)
            switch_to(server, "prefill_0", "decode", home="prefill")
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
