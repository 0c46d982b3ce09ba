"""Triton entry point of the pdserve Python-based backend: a thin adapter.

Reads the model's config.pbtxt ``parameters``, builds the role (router,
prefill, decode, aggregated) and hands it each request. Every request ends with
the FINAL flag: a role that raises gets its error sent here.
"""

from __future__ import annotations

import os
import site

# The stub's interpreter does not know our venv; the launcher passes its
# site-packages (with .pth files, so the editable install resolves).
for _dir in os.environ.get("PDSERVE_SITE_PACKAGES", "").split(os.pathsep):
    if _dir:
        site.addsitedir(_dir)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from pdserve.errors import InvalidArgument, Unavailable  # noqa: E402
from pdserve.kvtransfer.shm import sweep_stale_segments  # noqa: E402
from pdserve.roles.common import ack  # noqa: E402
from pdserve.roles.cpu_quota import CpuQuotaError  # noqa: E402
from pdserve.roles.instance import apply_pinning, reserves_cpu  # noqa: E402
from pdserve.roles.requests import ROUTER_INPUTS, parse_request  # noqa: E402
from pdserve.roles.triton import (  # noqa: E402
    Responder,
    load_out,
    read_control,
    read_inputs,
    read_instance_request,
)
from pdserve.scheduler.compute import CpuCounters  # noqa: E402
from pdserve.scheduler.controller.protocol import (  # noqa: E402
    SWITCHABLE_ROLES,
    ControlCall,
    RouterLoad,
    answer_health,
    answer_router_health,
)
from pdserve.server.config import (  # noqa: E402
    InstanceConfig,
    parse_parameters,
    pool_threads,
)

log = logging.getLogger(__name__)

# A stub that crashes in native code (numpy, torch, the backend's C++ side) dies by
# a signal, and nothing in the log says where. Every thread's Python stack goes to
# stderr (tritonserver's log) first. No usable stderr: nothing to do.
with contextlib.suppress(AttributeError, ValueError, OSError, RuntimeError):
    faulthandler.enable(all_threads=True)
    # And on request: SIGUSR1 dumps them without stopping the stub (what a hung
    # stub waits on; ``TritonServer.dump_stacks``). Only where nobody handles it.
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        faulthandler.register(signal.SIGUSR1, all_threads=True)

EXECUTE_HOLD_S = 0.02


def _build_role(cfg: InstanceConfig, repository: Path) -> Any:
    if cfg.role == "router":
        from pdserve.roles.router import RouterRole

        return RouterRole(cfg, repository, pool_threads=pool_threads())
    if cfg.role == "prefill":
        from pdserve.roles.prefill import PrefillRole

        return PrefillRole(cfg)
    if cfg.role == "decode":
        from pdserve.roles.decode import DecodeRole

        return DecodeRole(cfg)
    from pdserve.roles.aggregated import AggregatedRole

    return AggregatedRole(cfg)


def _build_on_parts(cfg: InstanceConfig, parts: Any) -> Any:
    """A prefill or decode role on the weights and metrics another role left."""
    from pdserve.roles.decode import DecodeRole
    from pdserve.roles.prefill import PrefillRole

    return (PrefillRole if cfg.role == "prefill" else DecodeRole)(cfg, parts)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        self.cfg = parse_parameters(args["model_name"], params)
        if self.cfg.role != "router":
            # Triton 2.51 restarts a killed stub by running initialize again in the
            # same model load: the dead one's KV segment is ours to unlink.
            sweep_stale_segments()
        self.quota = apply_pinning(self.cfg)
        try:
            # args["model_repository"] is this model's directory; its parent is the
            # repository the router reads instance roles from.
            self.role = _build_role(self.cfg, Path(args["model_repository"]).parent)
        except BaseException:
            if self.quota is not None:  # a failed load leaves no cgroup behind
                self.quota.release()
            raise
        self.incarnation = os.urandom(8).hex()  # this stub process, in every heartbeat
        # The cores (or CPU quota) it computes on and how busy they are, in every
        # heartbeat (the ratio rule's compute check); an accelerator's load is not
        # measured.
        quota = (self.cfg.name, self.cfg.cpu_quota) if self.cfg.cpu_quota is not None else None
        self.cpu = (CpuCounters(quota=quota)
                    if self.cfg.device == "cpu" and self.cfg.role != "router" else None)
        self._tasks: set[asyncio.Task[None]] = set()
        self._switching = False

    async def execute(self, requests: list[Any]) -> None:
        # Decoupled: each request becomes its own task and answers on its own.
        loop = asyncio.get_running_loop()
        for request in requests:
            task = loop.create_task(self._serve(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # The stub schedules this coroutine with run_coroutine_threadsafe and only
        # then adds the future to its set of background futures; the done callback
        # removes it. Returning at once let the callback win that race (the loop
        # thread took the GIL first): "Cannot remove future from background;
        # KeyError" in the log, and the future then stayed in the set for good.
        # Sleeping past the GIL switch interval (5 ms) lets the stub's thread finish.
        await asyncio.sleep(EXECUTE_HOLD_S)

    async def _serve(self, request: Any) -> None:
        out = Responder(request, client_facing=self.cfg.role == "router")
        try:
            if self.cfg.role == "router":
                if (control := read_control(request)) is not None:  # the controller's
                    load = RouterLoad(self.cfg.name, self.incarnation, max(len(self._tasks) - 1, 0))
                    out.send(load_out(answer_router_health(ControlCall.from_bytes(control),
                                                           load)), final=True)
                    return
                params = json.loads(request.parameters() or "{}")
                req = parse_request(read_inputs(request, ROUTER_INPUTS), params,
                                    self.role.tokenizer, self.role.limits)
                await self.role.handle(request, req, out)
            elif (control := read_control(request)) is not None:
                call = ControlCall.from_bytes(control)
                if call.op == "set_role":
                    await self._set_role(call.role)
                elif self._switching:  # the old role is being released under us
                    raise Unavailable(f"{self.cfg.name} is switching roles")
                cpu = self.cpu
                load = replace(self.role.load(), incarnation=self.incarnation,
                               compute=cpu.read() if cpu is not None else {},
                               own_ticks=cpu.read_own() if cpu is not None else 0)
                out.send(load_out(answer_health(load)), final=True)
            else:
                op, payload = read_instance_request(request)
                if op == "ping":
                    ack(out)
                elif self._switching:
                    raise Unavailable(f"{self.cfg.name} is switching roles")
                else:
                    await self.role.handle(op, payload, out)
        except BaseException as exc:  # every path must end with FINAL
            out.fail(exc)
        finally:
            if self.cfg.role == "router":
                out.close()

    async def _set_role(self, role: str) -> None:
        """Switch between prefill and decode in place (``roles.switch``); refused
        while anything is in flight, so the caller drains first."""
        if self.cfg.role not in SWITCHABLE_ROLES:
            raise InvalidArgument(f"{self.cfg.name} is a {self.cfg.role} instance: only "
                                  f"{' and '.join(SWITCHABLE_ROLES)} instances switch roles")
        if role == self.cfg.role:
            return
        if self._switching:
            raise Unavailable(f"{self.cfg.name} is already switching roles")
        busy = self.role.load().in_flight
        if busy:
            raise Unavailable(f"{self.cfg.name} has {busy} requests in flight: drain it "
                              f"before switching it to {role}")
        from pdserve.roles.switch import switch_in_place

        self._switching = True  # set before any await: no request slips in
        try:
            self.cfg, self.role, error = await asyncio.to_thread(
                switch_in_place, self.cfg, self.role, role, _build_on_parts)
        finally:
            self._switching = False
        self._reserve_cpu()
        if error is not None:
            raise Unavailable(f"{self.cfg.name} could not switch to {role} and serves "
                              f"{self.cfg.role} again: {error}")

    def _reserve_cpu(self) -> None:
        """The quota's weight for the role served now (``reserves_cpu``); a weight
        that cannot be set leaves the instance serving, at the weight it had."""
        if self.quota is None:
            return
        try:
            self.quota.reserve(reserves_cpu(self.cfg.role))
        except CpuQuotaError as exc:
            log.warning("%s: %s", self.cfg.name, exc)

    def finalize(self) -> None:
        role = getattr(self, "role", None)
        if role is not None:
            role.close()
        quota = getattr(self, "quota", None)
        if quota is not None:
            quota.release()
        # The stub tears down its IPC state and then the interpreter, whose last
        # garbage collection segfaulted in every stub that had loaded the engine
        # (faulthandler: "Garbage-collecting", no Python frame; the kernel log:
        # triton_python_backend_stub at 0x60). Collected now, while that state is
        # alive, and what is left frozen: exit collects nothing more. The role has
        # released its KV, cgroup and threads above; the OS takes the memory.
        gc.collect()
        gc.freeze()
