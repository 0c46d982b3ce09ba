"""A role switch in place with fake roles: what is released, what is kept, and
the way back when the new role cannot be built."""

from __future__ import annotations

from typing import Any

from pdserve.roles.instance import RoleParts
from pdserve.roles.switch import switch_in_place
from pdserve.server.config import InstanceConfig, parse_parameters


class FakeRole:
    def __init__(self, cfg: InstanceConfig, parts: RoleParts) -> None:
        self.cfg, self.parts, self.released = cfg, parts, 0

    def release(self) -> RoleParts:
        self.released += 1
        return self.parts


def _cfg() -> InstanceConfig:
    return parse_parameters("prefill_0", {"role": "prefill", "model": "tiny"})


def test_switch_keeps_the_parts_and_releases_the_old_role_once() -> None:
    parts = RoleParts(engine="weights", metrics="metrics")  # type: ignore[arg-type]
    old = FakeRole(_cfg(), parts)
    built: list[tuple[str, Any]] = []

    def build(cfg: InstanceConfig, p: RoleParts) -> FakeRole:
        built.append((cfg.role, p))
        return FakeRole(cfg, p)

    cfg, role, error = switch_in_place(old.cfg, old, "decode", build)
    assert error is None and cfg.role == "decode" and role.cfg.role == "decode"
    assert old.released == 1 and built == [("decode", parts)]
    assert cfg.name == "prefill_0" and cfg.max_batch_size == old.cfg.max_batch_size


def test_a_failed_switch_rebuilds_the_old_role_on_the_same_parts() -> None:
    parts = RoleParts(engine="weights", metrics="metrics")  # type: ignore[arg-type]
    old = FakeRole(_cfg(), parts)

    def build(cfg: InstanceConfig, p: RoleParts) -> FakeRole:
        if cfg.role == "decode":
            raise OSError("no shared memory left for the arena")
        return FakeRole(cfg, p)

    cfg, role, error = switch_in_place(old.cfg, old, "decode", build)
    assert isinstance(error, OSError)
    assert cfg.role == "prefill" and role.cfg.role == "prefill" and role.parts is parts
    assert role is not old and old.released == 1
