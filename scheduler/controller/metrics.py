"""The controller's own Prometheus metrics (its registry, its HTTP port).

Label values are bounded: roles, states, scenarios (a handful per
deployment), actions, and a reason *kind* (not the free-text reason).
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from pdserve.scheduler.controller.health import STATES

# A RatioDecision's reason text -> its label; the first needle found wins (the
# memory's refusal and the stranding one quote the balance rule they overrule).
_REASONS = (("compute saturated", "compute_saturated"), ("did no better", "memory"),
            ("stranding", "mixed_weights"),
            ("recall:", "recall"), ("explored ", "explore_back"), ("explore:", "explore"),
            ("mix changing", "mix_change"), ("no stage saturated", "not_saturated"),
            ("cooling down", "cooldown"), ("within tolerance", "tolerance"),
            ("balance rule", "balance_rule"), ("balanced", "balanced"),
            ("E2E up", "online"), ("no traffic", "no_traffic"),
            ("no signal", "no_signal"), ("minimum", "min_instances"),
            ("in progress", "busy"))
REASON_KINDS = (*(kind for _, kind in _REASONS), "other")


def reason_kind(reason: str) -> str:
    """Map a RatioDecision's free-text reason onto a bounded label value."""
    for needle, kind in _REASONS:
        if needle in reason:
            return kind
    return "other"


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Gauge("pdserve_controller_instances", "Instances by role and state",
                               ["role", "state"], registry=r)
        self.ratio = Gauge("pdserve_controller_instances_per_scenario",
                           "Routable + draining instances per scenario and role",
                           ["scenario", "role"], registry=r)
        self.decisions = Counter("pdserve_controller_ratio_decisions",
                                 "Ratio decisions by action and reason kind",
                                 ["scenario", "action", "reason"], registry=r)
        self.failures = Counter("pdserve_controller_instance_failures",
                                "Instances that became failed", ["role"], registry=r)
        self.recoveries = Counter("pdserve_controller_instance_recoveries",
                                  "Replaced instances that became healthy again", ["role"],
                                  registry=r)
        self.edits = Counter("pdserve_controller_repository_edits",
                             "Repository edits by kind", ["kind"], registry=r)
        self.probes = Counter("pdserve_controller_probes", "Probes by result", ["result"],
                              registry=r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set_instances(self, role_states: Iterable[tuple[str, str]]) -> None:
        tally = Tally(role_states)
        for role in ("prefill", "decode", "aggregated"):
            for state in STATES:
                self.instances.labels(role, state).set(tally.get((role, state), 0))

    def decision(self, scenario: str, action: str, reason: str) -> None:
        self.decisions.labels(scenario, action, reason_kind(reason)).inc()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint; returns the bound port (0 picks a free one)."""
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
