"""E3 with owned compute: each of the 4 instances limited to its own CPU quota.

On two shared cores a P/D ratio moves slots, not compute: every ratio runs on
the same two cores, so the best static ratio was only 1.21x (prompt-heavy) and
1.37x (output-heavy) the worst, and E3's "1.6x the worst static ratio" could
not be met by any controller. P/D-Serve's instances each own their NPUs. Here
each instance owns ``cpu_quota`` cores of CPU time in a cgroup of its own
(``roles/cpu_quota.py``); 4 x 0.3 = 1.2 cores, the rest of the two cores is left
to the router, Triton, the client and the controller. A stage's compute then
grows with its instance count, as on owned devices, and the ratio matters.
The quota was 0.4 until 2026-12-07: the rest then needed 0.7-0.9 cores where
0.4 were left, so the machine was full (1.76 of 2 cores prompt-heavy, 1.94 at
1P3D output-heavy; ``process_cpu``, RESULTS.md "Where the CPU goes") and a
ratio's throughput moved with whatever else ran. At 0.3 the stages' quotas are
what limits them (1P3D output-heavy: the three decodes use 0.90 of their 0.9),
and the best static ratio is 2.2-2.7x the worst, was 1.7-2.2x.

Everything else is E3's (``e3_dynamic_ratio``: the same phases, SLOs,
controller settings, static references before and after), with longer phases
(120 s: a day or a night is long against the controller's reaction, ~10 s from
a shift to the first window of one mix, then a drain and a switch, and a
cool-down before a second switch) and a cool-down of one ratio window.

    python -m perf.experiments.e3_owned [--quick] [--cpu-quota 0.3]

Needs a writable cgroup CPU controller (root here); writes its own RESULTS.md
section (``e3_owned``) next to E3's.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from perf.experiments import common
from perf.experiments import e3_dynamic_ratio as e3

NAME = "e3_owned"
CPU_QUOTA = 0.3  # cores per instance: 1.2 of the 2 cores
# Phases of 2 minutes; a cool-down of one ratio window (the window after a switch
# already measures the new ratio), so crossing two switches costs ~4 s less. The
# third phase brings the first phase's mix back: the controller recalls which
# ratio did best with it (``RatioPolicy.recall_s``). Where the model predicts a
# small gain or a small loss, the ratio is tried (``RatioPolicy.explore_gain``
# negative): with owned compute it predicted 9 % for 2P2D -> 3P1D, which measured
# 46 % better, and from one window to the next it read 2-16 % for it.
# Static passes between the dynamic runs (static, from 1P3D, static, from 2P2D,
# static), each dynamic run also judged against the passes right before and
# after it: the machine's speed moved 10-40 % between a run's first and last
# static pass (RESULTS.md, "How far do the static ratios repeat?").
# One decision moves as many instances as the model (or the recall) asks for
# (``RatioPolicy.max_step``): with one at a time, each shift between 1P3D and 3P1D
# was two switches a window apart, 19-27 s of a phase at worse ratios.
# After a window of a changing mix the next lasts 2 s, not 4
# (``RatioPolicy.mix_window_s``): the wait for a window of one mix was 8 s of each
# ~12 s reaction to a shift.
FULL = replace(e3.FULL, cpu_quota=CPU_QUOTA, phase_s=120.0, ratio_cooldown_s=4.0,
               ratio_recall_s=600.0, ratio_explore_gain=-0.1, ratio_max_step=3,
               ratio_mix_window_s=2.0, static_passes=3, interleave=True)
QUICK = replace(e3.QUICK, cpu_quota=CPU_QUOTA, ratio_max_step=FULL.ratio_max_step,
                ratio_mix_window_s=min(FULL.ratio_mix_window_s, e3.QUICK.ratio_interval_s))


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-quota", type=float, default=CPU_QUOTA, metavar="CORES",
                        help=f"cores of CPU time per instance (default {CPU_QUOTA}; the 4 "
                             f"instances' quotas must leave the router, client and Triton room "
                             f"on the 2 cores)")


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> dict[str, object]:
        if not 0 < args.cpu_quota <= 0.5:
            raise SystemExit(f"{NAME}: --cpu-quota must be in (0, 0.5] cores, got "
                             f"{args.cpu_quota}")
        cfg = replace(QUICK if args.quick else FULL, cpu_quota=args.cpu_quota)
        return e3.run(cfg, args.quick, args.out or common.out_dir(NAME, args.quick))

    return common.main(argv, key="e3_owned", name=NAME,
                       description=__doc__.split("\n")[0], quick_help="2 short phases",
                       plot=e3.plot, markdown=e3.markdown, run=run, add_arguments=_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
