"""The real probe client: Triton's HTTP API (tritonclient.http plus the generate extension).

One probe of model M on server S:
  1. ``is_model_ready`` (tritonclient.http);
  2. the loaded config (``get_model_config``): its ``generation`` parameter
     tells whether a reload has taken effect;
  3. the heartbeat: ``POST /v2/models/M/generate {"control": "{\"op\":\"health\"}"}``.
     The generate extension maps JSON fields to input tensors and output
     tensors back, and, unlike plain HTTP ``infer``, it accepts decoupled
     models (every pdserve instance is one) answering with one response.

A dead stub shows up in step 3 ("Stub process ... is not healthy"), not in 1.
A router is probed the same way (``probe_router``); its heartbeat answer is a
``RouterLoad``, not an instance's load.
``set_role`` is the same call as step 3 with ``{"op": "set_role", "role": R}``.
Every call has a timeout; failures are results (``ok=False``), never raised.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pdserve.errors import InvalidArgument
from pdserve.scheduler.controller.health import ProbeResult
from pdserve.scheduler.controller.protocol import (
    CONTROL_INPUT,
    LOAD_OUTPUT,
    ControlCall,
    parse_health_reply,
    parse_router_reply,
)
from pdserve.scheduler.controller.repository import GENERATION_KEY
from pdserve.scheduler.instance import InstanceLoad


@dataclass(frozen=True)
class ServerAddress:
    """``HOST:HTTP_PORT[:METRICS_PORT]``; metrics default to HTTP+2 (Triton's 8000/8002)."""

    host: str
    http_port: int
    metrics_port: int

    @classmethod
    def parse(cls, spec: str) -> ServerAddress:
        parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.rsplit(":", 1)
        try:
            if len(parts) == 3:
                return cls(parts[0], int(parts[1]), int(parts[2]))
            if len(parts) == 2:
                return cls(parts[0], int(parts[1]), int(parts[1]) + 2)
        except ValueError:
            pass
        raise InvalidArgument(f"server must be HOST:HTTP_PORT[:METRICS_PORT], got {spec!r}")

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidArgument("server host must not be empty")
        for port in (self.http_port, self.metrics_port):
            if not 0 < port < 65536:
                raise InvalidArgument(f"port must be in 1..65535, got {port}")

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def __str__(self) -> str:
        return self.http


class TritonProbeClient:
    """Probes over HTTP; ``server`` arguments are ``ServerAddress.http`` strings."""

    def __init__(self, timeout_s: float = 2.0, switch_timeout_s: float = 30.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not switch_timeout_s > 0:
            raise ValueError(f"switch_timeout_s must be positive, got {switch_timeout_s}")
        self.timeout_s = timeout_s
        self.switch_timeout_s = switch_timeout_s  # a switch builds a role: arena, threads

    def probe(self, server: str, model: str) -> ProbeResult:
        return self._probe(server, model, lambda reply: parse_health_reply(reply, model))

    def probe_router(self, server: str, model: str) -> ProbeResult:
        """The same three steps for a router; ``load`` stays None (it has no slots)."""
        def alive(reply: bytes) -> None:
            parse_router_reply(reply, model)
        return self._probe(server, model, alive)

    def _probe(self, server: str, model: str,
               parse: Callable[[bytes], InstanceLoad | None]) -> ProbeResult:
        client = httpclient.InferenceServerClient(
            server, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )
        try:
            if not client.is_model_ready(model):
                return ProbeResult(ok=False, error=f"{model} is not ready on {server}")
            config: dict[str, Any] = client.get_model_config(model)
        except (InferenceServerException, OSError) as exc:
            return ProbeResult(ok=False, error=f"{model} on {server}: {exc}",
                               timed_out=is_timeout(exc))
        finally:
            client.close()
        generation = _generation(config)
        try:
            load = parse(self._heartbeat(server, model))
        except (InvalidArgument, OSError, ValueError) as exc:
            return ProbeResult(ok=False, generation=generation, error=f"heartbeat: {exc}",
                               timed_out=is_timeout(exc))
        return ProbeResult(ok=True, load=load, generation=generation)

    def set_role(self, server: str, model: str, role: str) -> ProbeResult:
        try:
            reply = self._heartbeat(server, model, ControlCall("set_role", role),
                                    self.switch_timeout_s)
            return ProbeResult(ok=True, load=parse_health_reply(reply, model))
        except (InvalidArgument, OSError, ValueError) as exc:
            return ProbeResult(ok=False, error=f"set_role {role}: {exc}")

    def _heartbeat(self, server: str, model: str, call: ControlCall | None = None,
                   timeout_s: float | None = None) -> bytes:
        body = json.dumps({CONTROL_INPUT: (call or ControlCall()).to_bytes().decode()}).encode()
        req = urllib.request.Request(
            f"http://{server}/v2/models/{model}/generate", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise OSError(f"HTTP {exc.code}: {detail}") from None
        value = reply.get(LOAD_OUTPUT) if isinstance(reply, dict) else None
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise InvalidArgument(f"reply has no {LOAD_OUTPUT!r} string: {str(reply)[:200]}")
        return value.encode()

    def close(self) -> None:
        """Nothing pooled: each probe opens and closes its own connection."""


def is_timeout(exc: BaseException) -> bool:
    """No answer within the timeout (connecting or reading), as opposed to an answer
    that says something is wrong (``HealthPolicy.hang_timeout_s``)."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return isinstance(exc.reason, TimeoutError)
    return isinstance(exc, TimeoutError)


def _generation(config: dict[str, Any]) -> int | None:
    raw = config.get("parameters", {}).get(GENERATION_KEY, {}).get("string_value")
    if raw is None:
        return 0  # never bumped
    return int(raw) if str(raw).isdigit() else None
