"""The state file: what every router (every tritonserver) reads about instances.

Several routers must agree on which instances are in routing. The shared
truth is the model repository (roles, scenarios, weights) plus this small
JSON file, written next to the repository (``<repo>.state.json``) by the
controller and by ``pdserve upgrade``. Readers never see a torn file: it is
written to a temp file, fsynced, and ``os.replace``d. Writers serialise on an
``flock`` and each owns its keys:

    {"version": 1, "updated_at": 1723456789.1,
     "instances": {"prefill_0": {"role": "prefill", "scenario": "default",
                                 "state": "healthy", "routable": true, ...}},
     "ratios": {"default": {"prefill": 2, "decode": 2}},
     "draining": {"decode_1": {"owner": "upgrade", "reason": "...", "since": ...}}}

A router routes to an instance only when ``routable`` is true AND its name is
not in ``draining`` (in-flight work there finishes; no new work is sent).
An instance absent from ``instances`` (new, or no controller running) is
treated as routable by the router, so a deployment works without a controller.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidArgument

STATE_VERSION = 1


@dataclass(frozen=True)
class InstanceStatus:
    role: str
    scenario: str
    state: str
    routable: bool
    generation: int = 0
    reason: str = ""
    since: float = 0.0
    servers: dict[str, str] = field(default_factory=dict)  # server -> its state there
    # Set while the instance serves another role than the repository's, switched
    # in place by the controller; routers accept it once the heartbeat agrees.
    acting_role: str = ""


@dataclass(frozen=True)
class DrainRequest:
    owner: str  # "controller" or "upgrade": only the owner lifts it
    reason: str
    since: float


@dataclass(frozen=True)
class ControllerState:
    updated_at: float = 0.0
    instances: dict[str, InstanceStatus] = field(default_factory=dict)
    ratios: dict[str, dict[str, int]] = field(default_factory=dict)
    draining: dict[str, DrainRequest] = field(default_factory=dict)

    def is_routable(self, name: str) -> bool:
        """The router's rule (see the module docstring)."""
        if name in self.draining:
            return False
        status = self.instances.get(name)
        return status is None or status.routable

    def to_json(self) -> str:
        body: dict[str, Any] = {"version": STATE_VERSION, **asdict(self)}
        return json.dumps(body, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ControllerState:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
                raise ValueError(f"expected a version {STATE_VERSION} state object")
            return cls(
                updated_at=float(raw.get("updated_at", 0.0)),
                instances={k: InstanceStatus(**v) for k, v in raw.get("instances", {}).items()},
                ratios={k: {r: int(n) for r, n in v.items()}
                        for k, v in raw.get("ratios", {}).items()},
                draining={k: DrainRequest(**v) for k, v in raw.get("draining", {}).items()},
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"malformed controller state file: {exc}") from None


def default_state_path(repository: Path) -> Path:
    repository = Path(repository).resolve()
    return repository.parent / f"{repository.name}.state.json"


def read_state(path: Path) -> ControllerState:
    """The current state; an absent file is an empty state (no controller yet)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return ControllerState()
    return ControllerState.from_json(text)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(f"{path}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_state(
    path: Path, change: Callable[[ControllerState], ControllerState]
) -> ControllerState:
    """Read-modify-write under the lock; the new file replaces the old atomically."""
    path = Path(path)
    with _locked(path):
        new = change(read_state(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return new


def with_drain(state: ControllerState, name: str, request: DrainRequest) -> ControllerState:
    return ControllerState(state.updated_at, state.instances, state.ratios,
                           {**state.draining, name: request})


def without_drain(state: ControllerState, name: str, owner: str) -> ControllerState:
    current = state.draining.get(name)
    if current is None or current.owner != owner:
        return state
    rest: Mapping[str, DrainRequest] = {k: v for k, v in state.draining.items() if k != name}
    return ControllerState(state.updated_at, state.instances, state.ratios, dict(rest))
