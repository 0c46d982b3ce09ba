"""Rolling upgrade: ``pdserve upgrade --repository DIR --model-dir DIR | --preset NAME``.

One instance at a time, so the deployment keeps serving:

    drain (state file; no new work, in-flight finishes: heartbeat in_flight == 0,
           or drain_timeout_s)
      -> set_model edit (bumps generation: Triton reloads it with a fresh stub)
      -> check: every server reports the new generation loaded AND the heartbeat answers
      -> re-admit (lift the drain) -> next instance

If an instance fails its check the upgrade stops there and says so; that
instance stays drained (out of routing) and the rest keep their old weights.
Re-running the command after fixing the cause continues where it stopped
(instances already on the new model with it loaded are skipped).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.errors import PdserveError
from pdserve.scheduler.controller.health import ProbeClient, ProbeResult
from pdserve.scheduler.controller.repository import ModelEntry, Repository
from pdserve.scheduler.controller.state import (
    DrainRequest,
    default_state_path,
    read_state,
    update_state,
    with_drain,
    without_drain,
)

log = logging.getLogger(__name__)
OWNER = "upgrade"


@dataclass(frozen=True)
class UpgradeOptions:
    servers: tuple[str, ...]
    state_path: Path
    drain_timeout_s: float = 120.0
    check_timeout_s: float = 300.0
    poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("an upgrade needs at least one server to check instances on")
        for key in ("drain_timeout_s", "check_timeout_s", "poll_interval_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


@dataclass
class UpgradeReport:
    model: str
    upgraded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.failed is None


def upgrade_order(instances: Mapping[str, ModelEntry]) -> list[str]:
    """Per scenario, prefills and decodes alternately (then aggregated ones).

    A prefill hands KV only to a decode of the same weights, so each step must
    leave a working old pair or a working new pair: P0 new (old P1+D* serve),
    D0 new (new P0+D0 and old P1+D1 serve), P1 new (new pair serves), D1 new.
    Upgrading both decodes first would leave new decodes with only old prefills.
    """
    order: list[str] = []
    for scenario in sorted({e.scenario for e in instances.values()}):
        def of(role: str, sc: str = scenario) -> list[str]:
            return sorted(n for n, e in instances.items() if e.scenario == sc and e.role == role)

        prefills, decodes = of("prefill"), of("decode")
        for i in range(max(len(prefills), len(decodes))):
            order += prefills[i:i + 1] + decodes[i:i + 1]
        order += of("aggregated")
    return order


class RollingUpgrade:
    def __init__(
        self,
        repository: Repository,
        probe: ProbeClient,
        options: UpgradeOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.repo = repository
        self.probe = probe
        self.options = options
        self.clock = clock
        self.sleep = sleep

    def run(self, model: str, names: Sequence[str] | None = None) -> UpgradeReport:
        report = UpgradeReport(model)
        # Instances the controller switched in place serve (and are upgraded in)
        # the role they act in, not the repository's.
        acting = {n: st.acting_role
                  for n, st in read_state(self.options.state_path).instances.items()
                  if st.acting_role}
        instances = {n: e.with_role(acting[n]) if n in acting else e
                     for n, e in self.repo.instances().items()}
        for name in names or upgrade_order(instances):
            entry = instances.get(name)
            if entry is None:
                report.failed, report.error = name, f"{name} is not an instance in the repository"
                return report
            if entry.model == model and self._loaded(name, entry.generation):
                # Current; a re-run after a failed check finds the instance it left
                # drained loaded now: its check has passed, back into routing.
                drain = read_state(self.options.state_path).draining.get(name)
                if drain is not None and drain.owner == OWNER:
                    log.info("%s is loaded on %s now: lifting the drain an earlier run left",
                             name, model)
                    update_state(self.options.state_path,
                                 lambda s, name=name: without_drain(s, name, OWNER))
                report.skipped.append(name)
                continue
            error = self._upgrade_one(name, model, acting.get(name, ""))
            if error:
                report.failed, report.error = name, error
                log.error("upgrade stopped at %s: %s", name, error)
                return report
            report.upgraded.append(name)
        return report

    def _upgrade_one(self, name: str, model: str, role: str = "") -> str:
        request = DrainRequest(OWNER, f"rolling upgrade to {model}", time.time())
        update_state(self.options.state_path, lambda s: with_drain(s, name, request))
        self._wait_idle(name)
        try:
            entry = self.repo.set_model(name, model, reason=f"rolling upgrade to {model}",
                                        role=role)
        except (PdserveError, OSError) as exc:
            return f"edit failed: {exc}"
        error = self._wait_loaded(name, entry.generation)
        if error:
            return error  # stays drained: out of routing until someone fixes it
        update_state(self.options.state_path, lambda s: without_drain(s, name, OWNER))
        log.info("upgraded %s to %s (generation %d)", name, model, entry.generation)
        return ""

    def _probe_all(self, name: str) -> list[ProbeResult]:
        return [self.probe.probe(server, name) for server in self.options.servers]

    def _wait_idle(self, name: str) -> None:
        deadline = self.clock() + self.options.drain_timeout_s
        while self.clock() < deadline:
            results = self._probe_all(name)
            # A dead instance has nothing in flight worth waiting for.
            if all(not r.ok or (r.load is not None and r.load.in_flight == 0) for r in results):
                return
            self.sleep(self.options.poll_interval_s)
        log.warning("%s still busy after %.0fs of draining; reloading anyway", name,
                    self.options.drain_timeout_s)

    def _loaded(self, name: str, generation: int) -> bool:
        return all(r.ok and (r.generation is None or r.generation >= generation)
                   for r in self._probe_all(name))

    def _wait_loaded(self, name: str, generation: int) -> str:
        deadline = self.clock() + self.options.check_timeout_s
        last: list[ProbeResult] = []
        while self.clock() < deadline:
            last = self._probe_all(name)
            if all(r.ok and (r.generation is None or r.generation >= generation) for r in last):
                return ""
            self.sleep(self.options.poll_interval_s)
        why = "; ".join(r.error or f"generation {r.generation} loaded" for r in last) or "no probe"
        return (f"{name} failed its check: generation {generation} not healthy after "
                f"{self.options.check_timeout_s:.0f}s ({why})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model-dir", type=Path, help="checkpoint directory of the new weights")
    target.add_argument("--preset", help="built-in preset name of the new weights")
    parser.add_argument("--server", action="append", default=[],
                        help="HOST:HTTP_PORT[:METRICS_PORT] of a tritonserver (repeatable)")
    parser.add_argument("--instance", action="append", default=[],
                        help="upgrade only these instances, in this order (default: all)")
    parser.add_argument("--state-file", type=Path, help="default: <repository>.state.json")
    parser.add_argument("--drain-timeout-s", type=float, default=120.0)
    parser.add_argument("--check-timeout-s", type=float, default=300.0)


def run(args: argparse.Namespace) -> int:
    from pdserve.scheduler.controller.probe import ServerAddress, TritonProbeClient

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.model_dir is not None and not Path(args.model_dir).is_dir():
            raise ValueError(f"--model-dir {args.model_dir} is not a directory")
        model = str(Path(args.model_dir).resolve()) if args.model_dir else str(args.preset)
        servers = tuple(ServerAddress.parse(s).http for s in args.server or ["127.0.0.1:8000"])
        repo = Repository(args.repository)
        options = UpgradeOptions(
            servers=servers,
            state_path=args.state_file or default_state_path(args.repository),
            drain_timeout_s=args.drain_timeout_s,
            check_timeout_s=args.check_timeout_s,
        )
    except (ValueError, PdserveError) as exc:
        print(f"pdserve upgrade: {exc}", file=sys.stderr)
        return 2
    probe = TritonProbeClient()
    try:
        report = RollingUpgrade(repo, probe, options).run(model, args.instance or None)
    finally:
        probe.close()
    print(f"upgraded: {report.upgraded or '-'}  already current: {report.skipped or '-'}")
    if not report.ok:
        print(f"pdserve upgrade: stopped at {report.failed}: {report.error} "
              f"(it stays drained; the rest keep their old weights)", file=sys.stderr)
        return 1
    return 0
