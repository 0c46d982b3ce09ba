"""Plumbing shared by the experiments: deploy a spec, drive it, record results.

Nothing here decides what an experiment measures; it starts servers the same
way the serving tests do (``TritonServer`` on free loopback ports, always
stopped), sends load through the ``pdserve.bench`` library, and writes files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.client import ClientConfig, TritonStreamClient
from pdserve.bench.metrics import Slo, Summary, summarize
from pdserve.bench.records import RequestRecord, RequestSpec
from pdserve.bench.runner import LoadConfig, RunResult, run_load
from pdserve.server.config import InstanceConfig
from pdserve.server.launcher import ServerOptions, TritonServer, describe_exit, free_port
from pdserve.server.repo import instances_from_spec, write_repository
from perf.experiments import process_cpu

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_ROOT = REPO_ROOT / "perf" / "out"
FIGURES = REPO_ROOT / "perf" / "figures"
RESULTS_MD = REPO_ROOT / "perf" / "RESULTS.md"
AZURE_CONV = REPO_ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: shared cores make load average part of it."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


Adjust = Callable[[InstanceConfig], InstanceConfig]


@contextlib.contextmanager
def deployed(spec: dict[str, Any], workdir: Path, ready_timeout_s: float = 240.0,
             adjust: Adjust | None = None, poll_secs: int = 5) -> Iterator[TritonServer]:
    """Build ``spec`` into a repository under ``workdir`` and serve it; always stopped.

    ``adjust`` may change single instances where the spec format is global
    (e.g. prefill slots apart from the decode batch size).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "repo"
    instances = instances_from_spec(spec)
    if adjust is not None:
        instances = [adjust(cfg) for cfg in instances]
    write_repository(instances, repo, force=True)
    options = ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), ready_timeout_s=ready_timeout_s,
                            poll_secs=poll_secs,
                            log_file=workdir / "tritonserver.log")
    with TritonServer(options) as server:
        yield server


@contextlib.contextmanager
def client_on(cores: set[int]) -> Iterator[None]:
    """Pin this process (the load generator) to ``cores`` for a while.

    Call it after the server started: children inherit the mask they are
    forked with, and the server must keep its own pinning.
    """
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class ServerDied(RuntimeError):
    """tritonserver exited while an experiment drove it: what came back is the
    dead server's errors, not the deployment's figures."""


# Lines of a tritonserver log that say why it aborted (gRPC core, C++, signal).
_FATAL = re.compile(r"ASSERTION FAILED|terminate called|Signal \(\d+\) received")


def check_alive(server: TritonServer, during: str) -> None:
    """Raise ``ServerDied`` if ``server``'s tritonserver is not running, with the
    log's last fatal lines (Triton 2.51 aborts on upstream races: a gRPC stream
    cancelled as its response completes, a stub dying with an IPC lock held)."""
    proc = server.process
    returncode = None if proc is None else proc.poll()
    if proc is not None and returncode is None:
        return
    why = ""
    log = server.options.log_file
    if log is not None and log.exists():
        fatal = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                 if _FATAL.search(ln)]
        if fatal:
            why = ": " + " / ".join(fatal[-2:])
    raise ServerDied(f"tritonserver {describe_exit(returncode)} during {during}{why}")


@dataclass(frozen=True)
class LoadRun:
    """One measured point: what was sent and what came back."""

    label: str
    records: tuple[RequestRecord, ...]
    wall_s: float
    # cores each process used over the load (``process_cpu.cores``): the load
    # generator, tritonserver, each stub by model name, the controller
    cpu_cores: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock (time.time()) when the load began

    def summary(self, slo: Slo | None = None) -> Summary:
        return summarize(self.records, slo)

    def window(self) -> dict[str, float]:
        """When it ran, as the host gauge's ``annotate`` reads a row."""
        return {"started_at": self.started_at, "wall_s": self.wall_s}


def drive(server: TritonServer, specs: Sequence[RequestSpec], *, label: str,
          scenario: str | None = None, concurrency: int | None = None,
          max_duration_s: float | None = None, request_timeout_s: float = 120.0,
          seed: int = 0) -> LoadRun:
    """Send ``specs`` (open loop on their arrival times, or closed loop at ``concurrency``).

    Raises ``ServerDied`` when tritonserver is not running before or after the load:
    a run against a dead server is errors, not a measurement."""
    check_alive(server, f"{label} (before the load)")
    config = LoadConfig(mode="concurrency" if concurrency else "trace",
                        concurrency=concurrency or 1, max_duration_s=max_duration_s)
    from pdserve.bench.workload import PromptIds

    client_cfg = ClientConfig(url=server.options.grpc_url, prompt_ids=PromptIds(seed=seed),
                              scenario=scenario, request_timeout_s=request_timeout_s)

    async def go() -> RunResult:
        async with TritonStreamClient(client_cfg) as client:
            await client.wait_ready(60.0)
            return await run_load(specs, config, client.send)

    before, began, started_at = process_cpu.snapshot(), time.monotonic(), time.time()
    result = asyncio.run(go())
    used = process_cpu.cores(before, process_cpu.snapshot(), time.monotonic() - began)
    check_alive(server, label)
    return LoadRun(label, result.records, result.wall_s, used, started_at)


def summary_row(summary: Summary) -> dict[str, Any]:
    """The few figures an experiment table shows, from a bench Summary."""
    ttft, itl = summary.time_to_first_token_ms, summary.inter_token_latency_ms
    return {
        "requests": summary.num_requests,
        "ok": summary.num_ok,
        "errors": summary.errors_by_kind,
        "req_per_s": summary.request_throughput,
        "out_tok_per_s": summary.output_token_throughput,
        "ttft_p50_ms": ttft.p50 if ttft else None,
        "ttft_p90_ms": ttft.p90 if ttft else None,
        "ttft_p99_ms": ttft.p99 if ttft else None,
        "tpot_p50_ms": itl.p50 if itl else None,
        "tpot_p90_ms": itl.p90 if itl else None,
        "good": summary.num_good,  # requests meeting the SLO (None without one)
        "goodput": summary.goodput,
        "slo_attainment": summary.slo_attainment,
        "ttft_attainment": summary.ttft_attainment,
        "tpot_attainment": summary.tpot_attainment,
    }


def request_rows(records: Sequence[RequestRecord]) -> list[list[Any]]:
    """Per request, for finding which ones missed an SLO and why: [input tokens,
    output tokens, send s, response times s (relative to send), status]."""
    return [[r.input_len, r.output_tokens, round(r.send_s, 4),
             [round(t - r.send_s, 4) for t in r.response_s], r.status] for r in records]


def probe(server: TritonServer, specs: Sequence[RequestSpec], scenario: str | None = None
          ) -> list[list[Any]] | None:
    """``specs`` one at a time, right before a load point: per request (``request_rows``)
    how fast the machine served the unloaded run's requests then (None: no specs)."""
    if not specs:
        return None
    run_ = drive(server, specs, label="probe", scenario=scenario, concurrency=1)
    return request_rows(run_.records)


def out_dir(name: str, quick: bool) -> Path:
    path = OUT_ROOT / (f"{name}_quick" if quick else name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def publish_figure(png: Path, name: str) -> Path:
    """Copy a full run's PNG to perf/figures/ (committed; perf/out/ is not)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    dest = FIGURES / name
    shutil.copy2(png, dest)
    return dest


def replace_section(key: str, markdown: str, path: Path = RESULTS_MD) -> None:
    """Put ``markdown`` between this experiment's markers in RESULTS.md (append if new)."""
    start, end = f"<!-- experiments:{key} start -->", f"<!-- experiments:{key} end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# pdserve performance results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def rerender(path: Path, plot: Callable[[dict[str, Any], Path], Path]) -> dict[str, Any]:
    """An earlier run's JSON, its PNG redrawn next to it (``--from-json``)."""
    doc: dict[str, Any] = json.loads(path.read_text())
    doc["png"] = str(plot(doc, path.with_suffix(".png")))
    return doc


def publish(doc: dict[str, Any], key: str, name: str,
            markdown: Callable[[dict[str, Any], str | None], str],
            *, quick: bool, no_results: bool) -> int:
    """Print the experiment's section; for a full run also commit its figure and
    replace its RESULTS.md section (quick runs and --no-results touch neither)."""
    record = not quick and not no_results
    figure = None
    if record:
        figure = f"figures/{name}.png"
        publish_figure(Path(doc["png"]), f"{name}.png")
    text = markdown(doc, figure)
    print(text)
    if record:
        replace_section(key, text)
    return 0


def main(argv: list[str] | None, *, key: str, name: str, description: str, quick_help: str,
         run: Callable[[argparse.Namespace], dict[str, Any]],
         plot: Callable[[dict[str, Any], Path], Path],
         markdown: Callable[[dict[str, Any], str | None], str],
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The command line every experiment shares: run it (``run(args)``) or re-render
    an earlier run's JSON (``--from-json``), then ``publish``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--out", type=Path, help="output dir (default perf/out/<experiment>)")
    parser.add_argument("--from-json", type=Path,
                        help=f"re-render RESULTS.md and the PNG from an earlier run's {key}.json")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        doc = rerender(args.from_json, plot) if args.from_json else run(args)
    except ServerDied as exc:
        print(f"{name}: {exc}; nothing recorded", file=sys.stderr)
        return 1
    return publish(doc, key, name, markdown, quick=args.quick, no_results=args.no_results)


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"
