"""Switching a P/D instance between prefill and decode in place (no Triton import).

A reload through the repository costs a fresh stub: Python, torch and the
weights again, 9-15 s on two busy cores (E3). In place, the instance keeps its
weights and metrics and swaps only what differs between the roles:

    prefill --release--> RoleParts(engine weights, metrics) --> DecodeRole(cfg', parts)
             (thread, KV sender)                                (shm arena, receiver,
                                                                 batcher, token channels)

The caller (``model.py``) checks that nothing is in flight first, and the
controller drains the instance before it asks. The instance keeps its own
limits (batch size, KV capacity, transport) in either role.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from pdserve.roles.instance import RoleParts
from pdserve.server.config import InstanceConfig, Role

log = logging.getLogger(__name__)

# (config in the role to build, the kept parts) -> the role; model.py passes the
# real PrefillRole/DecodeRole, tests pass fakes.
Build = Callable[[InstanceConfig, RoleParts], Any]


def switch_in_place(cfg: InstanceConfig, role: Any, to_role: str, build: Build
                    ) -> tuple[InstanceConfig, Any, BaseException | None]:
    """Release ``role`` and build ``to_role`` on its weights. Returns the config and
    role now serving, and the error if the new role could not be built (the old
    role is then rebuilt on the same weights, so the instance still serves)."""
    parts: RoleParts = role.release()
    new_cfg = replace(cfg, role=cast(Role, to_role))
    try:
        return new_cfg, build(new_cfg, parts), None
    except Exception as exc:
        log.exception("%s: switch to %s failed; back to %s", cfg.name, to_role, cfg.role)
        return cfg, build(cfg, parts), exc
