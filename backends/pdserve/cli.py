"""The ``pdserve`` command.

Each subcommand lives in its own module, imported only when it runs, that
defines ``add_arguments(parser)`` and ``run(args) -> int``. Register new ones in
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pdserve.engine.generate_cli", "offline generation with the engine (no server)"),
    "serve": ("pdserve.server.launcher", "start tritonserver on a pdserve model repository"),
    "repo": ("pdserve.server.repo", "build a model repository from a deployment spec"),
    "bench": ("pdserve.bench.cli", "load generator: TTFT, ITL, throughput, goodput"),
    "controller": ("pdserve.scheduler.controller.cli", "health, replacement and P/D ratio loop"),
    "upgrade": ("pdserve.scheduler.controller.upgrade", "rolling upgrade to new weights"),
    "sim": ("pdserve.scheduler.sim.cli", "cluster simulator: run, fit a profile, compare"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Disaggregated prefill/decode LLM serving on Triton Inference Server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
