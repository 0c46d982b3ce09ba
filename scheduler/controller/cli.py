"""``pdserve controller``: the long-running controller process.

    pdserve controller --repository DIR --server 127.0.0.1:8000 [--server ...]
                       --probe-interval-s 2 --metrics-port 9400

Stops cleanly on SIGINT/SIGTERM: the loop ends, probe threads and the
metrics HTTP thread are joined. Several routers share what it decides through
the repository and ``<repository>.state.json`` (see ``state``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from pdserve.errors import PdserveError
from pdserve.scheduler.controller.controller import Controller, ControllerOptions
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.controller.metrics import ControllerMetrics
from pdserve.scheduler.controller.ratio_loop import RatioLoop
from pdserve.scheduler.controller.repository import Repository
from pdserve.scheduler.controller.state import default_state_path
from pdserve.scheduler.ratio import RatioPolicy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--server", action="append", default=[],
                        help="HOST:HTTP_PORT[:METRICS_PORT] of a tritonserver (repeatable; "
                             "metrics default to HTTP_PORT+2)")
    parser.add_argument("--probe-interval-s", type=float, default=2.0)
    parser.add_argument("--fail-threshold", type=int, default=2)
    parser.add_argument("--load-timeout-s", type=float, default=300.0)
    parser.add_argument("--hang-timeout-s", type=float, default=HealthPolicy.hang_timeout_s,
                        help="an instance or router whose probes only time out (no answer, "
                             "no error) is replaced once they have for this long: a busy "
                             "instance answers late (default %(default)s)")
    parser.add_argument("--ratio-interval-s", type=float, default=30.0)
    parser.add_argument("--switch-tick-s", type=float, default=ControllerOptions.switch_tick_s,
                        help="while a role switch is under way, move it on this often between "
                             "the probe ticks: switch the drained instance as soon as it is "
                             "idle (0: at the probe ticks only; default %(default)s)")
    parser.add_argument("--ratio-cooldown-s", type=float, default=60.0)
    parser.add_argument("--drain-timeout-s", type=float, default=60.0)
    parser.add_argument("--ratio-e2e-rise", type=float, default=RatioPolicy.e2e_rise,
                        help="online trigger: E2E latency above its baseline by this factor")
    parser.add_argument("--ratio-share-delta", type=float, default=RatioPolicy.share_delta,
                        help="online trigger: TTFT-share change that counts as rising/falling")
    parser.add_argument("--ratio-min-peak", type=float, default=0.0,
                        help="switch only when the busier stage's slots are at least this "
                             "share busy (0: any imbalance beyond the tolerance)")
    parser.add_argument("--ratio-compute-busy", type=float, default=RatioPolicy.compute_busy,
                        help="a stage whose CPU cores (from the instances' heartbeats) are this "
                             "share busy is saturated: no switch that gives it no other core "
                             "with room (default %(default)s)")
    parser.add_argument("--ratio-remember-s", type=float, default=RatioPolicy.remember_s,
                        help="do not switch back within this many seconds to a ratio that did "
                             "no better (by the tolerance) with the same request mix "
                             "(requests/s per second of E2E); 0: the rule's predictions alone "
                             "decide")
    parser.add_argument("--ratio-recall-s", type=float, default=RatioPolicy.recall_s,
                        help="keep what each ratio did with a request mix this long after the "
                             "mix went away; when it returns, switch toward the ratio that did "
                             "best with it (for mixes that return at a similar load, e.g. day "
                             "and night); 0 (default): off")
    parser.add_argument("--ratio-explore-gain", type=float, default=RatioPolicy.explore_gain,
                        help="try a switch the model predicts to cut the busier stage's "
                             "utilisation by more than this but within the tolerance, when its "
                             "ratio has not been measured with the current mix, and undo it if "
                             "it measures worse; negative: also one predicted to raise it by "
                             "less than -value (the model's error); 0 (default): off")
    parser.add_argument("--ratio-max-step", type=int, default=RatioPolicy.max_step,
                        help="instances one ratio decision may move: the balance rule goes "
                             "to the count its model predicts best within this many switches, "
                             "and a recalled ratio is reached in one decision; the donors "
                             "drain and switch side by side (default 1: one at a time)")
    parser.add_argument("--ratio-mix-window-s", type=float, default=RatioPolicy.mix_window_s,
                        help="after a window whose request mix was changing, the next "
                             "window lasts this long instead of --ratio-interval-s, so a "
                             "day/night shift is judged as soon as a short window of one mix "
                             "is in (default 0: off)")
    parser.add_argument("--no-ratio-compute", action="store_true",
                        help="count slots only, as if every instance owned its compute")
    parser.add_argument("--role-switch", choices=("reload", "live"), default="reload",
                        help="how a ratio switch changes an instance's role: 'reload' edits "
                             "the repository (Triton reloads it, seconds); 'live' asks the "
                             "instance to switch in place (keeps its weights, under a second; "
                             "the repository keeps its home role), falling back to 'reload'")
    parser.add_argument("--no-ratio", action="store_true", help="health and replacement only")
    parser.add_argument("--state-file", type=Path, help="default: <repository>.state.json")
    parser.add_argument("--edit-log", type=Path, help="JSON lines of every repository edit")
    parser.add_argument("--metrics-port", type=int, default=9400, help="0 picks a free port")
    parser.add_argument("--metrics-address", default="127.0.0.1")


def build(args: argparse.Namespace) -> Controller:
    from pdserve.scheduler.controller.probe import ServerAddress, TritonProbeClient
    from pdserve.scheduler.controller.signals import scrape_text

    addresses = [ServerAddress.parse(s) for s in args.server or ["127.0.0.1:8000"]]
    health = HealthPolicy(probe_interval_s=args.probe_interval_s,
                          probe_timeout_s=min(args.probe_interval_s, 5.0),
                          fail_threshold=args.fail_threshold, load_timeout_s=args.load_timeout_s,
                          hang_timeout_s=args.hang_timeout_s)
    options = ControllerOptions(
        servers=tuple(dict.fromkeys(a.http for a in addresses)),
        state_path=args.state_file or default_state_path(args.repository),
        health=health, ratio_interval_s=args.ratio_interval_s, role_switch=args.role_switch,
        switch_tick_s=args.switch_tick_s,
    )
    policy = RatioPolicy(cooldown_s=args.ratio_cooldown_s, min_peak=args.ratio_min_peak,
                         e2e_rise=args.ratio_e2e_rise, share_delta=args.ratio_share_delta,
                         compute_busy=None if args.no_ratio_compute else args.ratio_compute_busy,
                         remember_s=args.ratio_remember_s, recall_s=args.ratio_recall_s,
                         explore_gain=args.ratio_explore_gain,
                         max_step=args.ratio_max_step, mix_window_s=args.ratio_mix_window_s)
    ratio = RatioLoop(policy, args.drain_timeout_s)

    def scrape() -> list[str]:
        return [scrape_text(a.metrics_url, health.probe_timeout_s) for a in addresses]

    return Controller(
        Repository(args.repository, edit_log=args.edit_log),
        TritonProbeClient(health.probe_timeout_s),
        options, ratio=ratio, metrics=ControllerMetrics(),
        scrape=None if args.no_ratio else scrape,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        controller = build(args)
    except (ValueError, PdserveError) as exc:
        print(f"pdserve controller: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        port = controller.metrics.serve(args.metrics_port, args.metrics_address)
        print(f"pdserve controller: watching {', '.join(controller.options.servers)}; "
              f"state {controller.options.state_path}; metrics "
              f"http://{args.metrics_address}:{port}/metrics", flush=True)
        controller.run(stop, time.time)  # wall clock: routers compare updated_at
    except OSError as exc:
        print(f"pdserve controller: {exc}", file=sys.stderr)
        return 1
    finally:
        controller.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
