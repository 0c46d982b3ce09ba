"""``pdserve repo build SPEC.yaml -o DIR``: a deployment spec -> a model repository.

Spec (YAML)::

    model: tiny                 # built-in preset or a checkpoint directory
    dtype: float32
    device: cpu
    router: {name: pdserve, cpu_cores: "0-1"}
    limits: {max_tokens: 1024, max_batch_size: 32, kv_capacity_mb: 256, ttft_budget_s: 30,
             admission: on_demand}  # or {admission: queue, queue_cap: N}: the baseline
    kv: {transport: shm, send_mode: whole, ttl_s: 30, decode_start: on_landing}
    warmup_tokens: 16           # a request run by each instance at load (0: none)
    scenarios:
      default: {prefill: 1, decode: 1, cpu_cores: {prefill: ["0"], decode: ["1"]}}
      long:    {aggregated: 2}  # the aggregated baseline, behind the same router
      commit:  {prefill: 1, decode: 1, decode_start: on_commit}  # per-scenario override
      owned:   {prefill: 2, decode: 2, cpu_quota: 0.45}  # each instance owns 0.45 cores

Instances are numbered per role across scenarios (prefill_0, prefill_1,
decode_0, aggregated_0...); a ``cpu_cores`` list is cycled over a role's
instances. ``cpu_quota`` gives each instance of the group that many cores of CPU
time in a cgroup of its own (``roles/cpu_quota.py``). The tree is written to a
temp dir next to ``DIR`` and renamed into place, so a polling Triton never sees
half a repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pdserve.server.config import InstanceConfig, Route, parse_cpu_cores, to_parameters

_INSTANCE_ROLES = ("prefill", "decode", "aggregated")
_TOP_KEYS = {"model", "dtype", "device", "router", "limits", "kv", "scenarios", "warmup_tokens"}

# The client-facing inputs and outputs, and the controller's heartbeat (``control``
# -> ``load``, op health only: scheduler/controller/protocol.py ``RouterLoad``).
ROUTER_IO = """\
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] optional: true },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "scenario" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "control" data_type: TYPE_STRING dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "output_ids" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "load" data_type: TYPE_STRING dims: [ 1 ] }
]
"""

# Data path: op + payload (roles/contracts.py). Heartbeat: control -> load
# (scheduler/controller/protocol.py), sent alone by the controller through the
# generate extension, hence every input is optional; a request with neither
# gets INVALID_ARG from the role.
INSTANCE_IO = """\
model_transaction_policy { decoupled: true }
input [
  { name: "op" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "payload" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "control" data_type: TYPE_STRING dims: [ 1 ] optional: true }
]
output [
  { name: "payload" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "load" data_type: TYPE_STRING dims: [ 1 ] }
]
"""


def config_pbtxt(cfg: InstanceConfig) -> str:
    """One model's config.pbtxt: backend pdserve, one CPU instance, parameters."""
    io = ROUTER_IO if cfg.role == "router" else INSTANCE_IO
    params = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: {_quote(v)} }} }}\n'
        for k, v in sorted(to_parameters(cfg).items())
    )
    return (
        f'name: "{cfg.name}"\nbackend: "pdserve"\nmax_batch_size: 0\n{io}'
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + params
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def instances_from_spec(spec: Mapping[str, Any]) -> list[InstanceConfig]:
    """Validate a spec and expand it into every instance's config (router first)."""
    if not isinstance(spec, Mapping):
        raise ValueError("a deployment spec must be a YAML mapping")
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown spec keys {unknown}; known: {sorted(_TOP_KEYS)}")
    limits = _section(spec, "limits", {"max_tokens", "max_batch_size", "max_step_tokens",
                                       "kv_capacity_mb", "ttft_budget_s", "admission",
                                       "queue_cap"})
    kv = _section(spec, "kv", {"transport", "send_mode", "ttl_s", "secret", "decode_start"})
    router = _section(spec, "router", {"name", "cpu_cores", "num_threads"})
    common: dict[str, Any] = {
        "model": str(spec.get("model", "tiny")),
        "dtype": str(spec.get("dtype", "float32")),
        "device": str(spec.get("device", "cpu")),
        "max_batch_size": int(limits.get("max_batch_size", 32)),
        "max_step_tokens": int(limits.get("max_step_tokens", 2048)),
        "kv_capacity_bytes": int(float(limits.get("kv_capacity_mb", 256)) * (1 << 20)),
        "kv_transport": str(kv.get("transport", "shm")),
        "kv_send_mode": str(kv.get("send_mode", "whole")),
        "decode_start": str(kv.get("decode_start", "on_landing")),
        "kv_ttl_s": float(kv.get("ttl_s", 30.0)),
        "kv_secret": str(kv.get("secret", "pdserve-local")),
        "max_tokens_limit": int(limits.get("max_tokens", 1024)),
        "admission": str(limits.get("admission", "on_demand")),
        "queue_cap": int(limits.get("queue_cap", 0)),
        "warmup_tokens": int(spec.get("warmup_tokens", 16)),
    }
    scenarios = spec.get("scenarios") or {"default": {"prefill": 1, "decode": 1}}
    if not isinstance(scenarios, Mapping):
        raise ValueError("scenarios must map a name to {prefill, decode} or {aggregated} counts")
    counters = dict.fromkeys(_INSTANCE_ROLES, 0)
    instances: list[InstanceConfig] = []
    routes: dict[str, Route] = {}
    for scenario, group in scenarios.items():
        group = _group(str(scenario), group)
        names: dict[str, list[str]] = {role: [] for role in _INSTANCE_ROLES}
        cores = group.get("cpu_cores") or {}
        overrides = {"decode_start": str(group["decode_start"])} if "decode_start" in group else {}
        quota = _quota(str(scenario), group.get("cpu_quota"))
        for role in _INSTANCE_ROLES:
            for i in range(int(group.get(role, 0))):
                name = f"{role}_{counters[role]}"
                counters[role] += 1
                names[role].append(name)
                core_list = cores.get(role) or []
                pinned = parse_cpu_cores(str(core_list[i % len(core_list)])) if core_list else None
                instances.append(InstanceConfig(
                    name=name, role=role, scenario=str(scenario),  # type: ignore[arg-type]
                    cpu_cores=pinned, cpu_quota=quota, **{**common, **overrides},
                ))
        routes[str(scenario)] = Route(
            prefill=tuple(names["prefill"]), decode=tuple(names["decode"]),
            aggregated=tuple(names["aggregated"]),
        )
    router_cores = router.get("cpu_cores")
    head = InstanceConfig(
        name=str(router.get("name", "pdserve")),
        role="router",
        cpu_cores=parse_cpu_cores(str(router_cores)) if router_cores is not None else None,
        num_threads=int(router["num_threads"]) if "num_threads" in router else None,
        ttft_budget_s=float(limits.get("ttft_budget_s", 30.0)),
        routes=routes,
        **common,
    )
    return [head, *instances]


def _section(spec: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"unknown {key} keys {unknown}; known: {sorted(allowed)}")
    return value


def _group(scenario: str, group: object) -> Mapping[str, Any]:
    if not isinstance(group, Mapping):
        raise ValueError(f"scenario {scenario!r} must be a mapping, got {group!r}")
    unknown = sorted(set(group) - {*_INSTANCE_ROLES, "cpu_cores", "cpu_quota", "decode_start"})
    if unknown:
        raise ValueError(f"scenario {scenario!r}: unknown keys {unknown}")
    for role in _INSTANCE_ROLES:
        count = group.get(role, 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"scenario {scenario!r}: {role} must be a count >= 0, got {count!r}")
    return group


def _quota(scenario: str, value: object) -> float | None:
    """A group's ``cpu_quota``: the cores each of its instances owns. One number for
    all roles, since an instance that switches roles keeps its process and its quota."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scenario {scenario!r}: cpu_quota must be a number of cores per "
                         f"instance, got {value!r}")
    return float(value)


def write_repository(instances: list[InstanceConfig], out: Path, *, force: bool = False) -> Path:
    """Write every model dir (config.pbtxt + ``1/``) and rename the tree into ``out``."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for cfg in instances:
            model_dir = tmp / cfg.name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "1" / ".keep").write_text("")
            (model_dir / "config.pbtxt").write_text(config_pbtxt(cfg))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build(spec_path: Path, out: Path, *, force: bool = False) -> list[InstanceConfig]:
    spec = yaml.safe_load(Path(spec_path).read_text())
    instances = instances_from_spec(spec)
    write_repository(instances, out, force=force)
    return instances


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="repo_command", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="write a model repository from a deployment spec")
    b.add_argument("spec", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--force", action="store_true", help="replace an existing output dir")


def run(args: argparse.Namespace) -> int:
    try:
        instances = build(args.spec, args.output, force=args.force)
    except (ValueError, FileExistsError, OSError, yaml.YAMLError) as exc:
        print(f"pdserve repo build: {exc}")
        return 2
    print(f"wrote {args.output}: " + ", ".join(f"{c.name} ({c.role})" for c in instances))
    return 0
