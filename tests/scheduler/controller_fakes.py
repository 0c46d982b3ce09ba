"""Fakes for the controller tests: a repository on tmp_path and a fake Triton."""

from __future__ import annotations

from pathlib import Path

from pdserve.scheduler.controller.health import ProbeResult
from pdserve.scheduler.controller.repository import Repository
from pdserve.scheduler.instance import InstanceLoad
from pdserve.server.config import InstanceConfig
from pdserve.server.repo import instances_from_spec, write_repository


def make_repo(tmp_path: Path, prefill: int = 2, decode: int = 2) -> Repository:
    spec = {"scenarios": {"default": {"prefill": prefill, "decode": decode}}}
    instances: list[InstanceConfig] = instances_from_spec(spec)
    write_repository(instances, tmp_path / "repo")
    return Repository(tmp_path / "repo", edit_log=tmp_path / "edits.jsonl")


class FakeTriton:
    """Loads what the repository says when ``poll()`` runs, like poll mode does.

    ``kill(model)`` is a dead stub: ready, but the heartbeat fails until the
    model is reloaded (its generation changes and a poll happens).
    """

    def __init__(self, repo: Repository, server: str = "s0") -> None:
        self.repo = repo
        self.server = server
        self.loaded: dict[str, int] = {}
        self.dead: set[str] = set()
        self.broken: set[str] = set()  # fails to load at all (bad weights)
        self.in_flight: dict[str, int] = {}
        self.probes: list[str] = []
        self.router_probes: list[str] = []
        self.acting: dict[str, str] = {}  # switched in place; gone at a reload
        self.refuse_switch: set[str] = set()
        # model -> requests that land on it just as set_role comes (routed there
        # before the routers heard of its drain): it refuses as busy
        self.land_at_switch: dict[str, int] = {}
        # model -> requests in flight when set_role comes that finish before the
        # next heartbeat: it refuses as busy, and is idle right after
        self.brief_at_switch: dict[str, int] = {}
        self.compute: dict[str, dict[str, list[int]]] = {}  # model -> its heartbeat counters
        self.own: dict[str, int] = {}  # model -> its process's own CPU ticks
        self.poll()

    def poll(self) -> None:
        for name, entry in self.repo.entries().items():  # instances and routers
            if self.loaded.get(name) != entry.generation:
                self.loaded[name] = entry.generation
                self.dead.discard(name)  # a reload starts a fresh stub
                self.acting.pop(name, None)  # ... in the repository's role

    def kill(self, model: str) -> None:
        self.dead.add(model)

    def restart_in_place(self, model: str) -> None:
        """What Triton 2.51 does to a killed stub: same generation, home role."""
        self.acting.pop(model, None)

    def set_role(self, server: str, model: str, role: str) -> ProbeResult:
        if model in self.land_at_switch:
            self.in_flight[model] = self.in_flight.get(model, 0) + self.land_at_switch.pop(model)
        if model in self.refuse_switch or self.in_flight.get(model, 0) \
                or self.brief_at_switch.pop(model, 0):
            return ProbeResult(ok=False, error=f"{model} has requests in flight")
        self.acting[model] = role
        return self.probe(server, model)

    def probe(self, server: str, model: str) -> ProbeResult:
        self.probes.append(model)
        entry = self.repo.instances()[model]
        if model in self.broken:
            return ProbeResult(ok=False, error=f"{model}: load failed")
        if model in self.dead:
            return ProbeResult(ok=False, generation=self.loaded[model],
                               error=f"Stub process '{model}' is not healthy")
        load = InstanceLoad(name=model, role=self.acting.get(model, entry.role),
                            scenario=entry.scenario, max_batch_size=entry.max_batch_size,
                            in_flight=self.in_flight.get(model, 0),
                            compute=self.compute.get(model, {}),
                            own_ticks=self.own.get(model, 0))
        return ProbeResult(ok=True, load=load, generation=self.loaded[model])

    def probe_router(self, server: str, model: str) -> ProbeResult:
        self.router_probes.append(model)
        if model in self.dead:
            return ProbeResult(ok=False, generation=self.loaded[model],
                               error=f"Stub process '{model}' is not healthy")
        return ProbeResult(ok=True, generation=self.loaded[model])

    def close(self) -> None:
        pass
