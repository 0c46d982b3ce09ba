"""``pdserve sim``: run a simulation, fit a profile, compare with a measured run.

    pdserve sim run --config perf/sim_configs/small.yaml \\
        --profile perf/sim_profiles/h100_llama3_8b.yaml --json out.json
    pdserve sim profile --engine engine.json --kv perf/kv_transfer_results.json -o prof.yaml
    pdserve sim compare SIM.json BENCH.json
"""

from __future__ import annotations

import argparse
import json
import sys

from pdserve.bench.report import format_table, write_json
from pdserve.errors import InvalidArgument
from pdserve.scheduler.sim.compare import compare_docs, format_comparison
from pdserve.scheduler.sim.fit import fit_profile
from pdserve.scheduler.sim.profile import load_profile, save_profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="simulate a cluster (output: pdserve bench JSON)")
    run.add_argument("--config", required=True, help="simulation YAML/JSON")
    run.add_argument("--profile", required=True, help="instance profile YAML/JSON")
    run.add_argument("--json", help="write the report here")
    run.add_argument("--seed", type=int, help="override the config's seed")
    run.add_argument("--per-request", action="store_true", help="one row per request in JSON")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes (scenarios are split among them)")
    prof = sub.add_parser("profile", help="fit a profile from perf/engine.py + kv_transfer.py")
    prof.add_argument("--engine", action="append", default=[], help="perf/engine.py --json")
    prof.add_argument("--kv", required=True, help="perf/kv_transfer.py results JSON")
    prof.add_argument("--transport", default="shm",
                      help="the result's transport: shm, tcp, mooncake (perf/kv_transfer.py) "
                           "or cuda_d2d (perf/gpu_profile.py)")
    prof.add_argument("--kv-capacity-tokens", type=int, default=65536)
    prof.add_argument("--name", default="fitted-cpu")
    prof.add_argument("-o", "--output", required=True, help="profile file (.yaml or .json)")
    cmp_ = sub.add_parser("compare", help="relative error per field: simulated vs measured")
    cmp_.add_argument("sim", help="pdserve sim run --json output")
    cmp_.add_argument("bench", help="pdserve bench --json output")


def run(args: argparse.Namespace) -> int:
    try:
        if args.sim_command == "run":
            return _run(args)
        if args.sim_command == "profile":
            profile = fit_profile(args.engine, args.kv, args.transport, args.name,
                                  args.kv_capacity_tokens)
            save_profile(profile, args.output)
            print(json.dumps(profile.to_dict(), indent=2))
            return 0
        with open(args.sim) as f_sim, open(args.bench) as f_bench:
            rows = compare_docs(json.load(f_sim), json.load(f_bench))
        print(format_comparison(rows))
        return 0
    except (InvalidArgument, OSError, ValueError) as exc:
        print(f"pdserve sim: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from pdserve.scheduler.sim.runner import simulate
    from pdserve.scheduler.sim.spec import load_config

    config, trace = load_config(args.config)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    profile = load_profile(args.profile)
    result, doc = simulate(config, profile, trace, args.per_request, args.workers)
    print(format_table(result.outcomes.summary(config.slo), "pdserve sim | simulated metrics"))
    sim = doc["simulation"]
    print(f"simulated {sim['simulated_s']:.0f} s, {sim['instances']} instances, "
          f"{sim['events']} events in {sim['wall_s']} s ({sim['events_per_s']:.0f} events/s)")
    if args.json:
        write_json(args.json, doc)
    return 0
