"""Instance config parsing and repository generation (no server)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.server import launcher
from pdserve.server.config import (
    POOL_ENV,
    POOL_RESERVE,
    TRITON_POOL_DEFAULT,
    InstanceConfig,
    Route,
    bls_threads,
    parse_cpu_cores,
    parse_parameters,
    pool_threads,
    to_parameters,
)
from pdserve.server.launcher import ServerOptions, TritonServer
from pdserve.server.repo import build, instances_from_spec, write_repository

SPEC = Path(__file__).parent / "specs" / "tiny_pd.yaml"


def test_cpu_cores() -> None:
    assert parse_cpu_cores("0") == (0,)
    assert parse_cpu_cores("0-2,5") == (0, 1, 2, 5)
    for bad in ("", "a", "3-1", "-1", "0,,1"):
        with pytest.raises(ValueError, match="cpu_cores"):
            parse_cpu_cores(bad)


def test_parameters_round_trip() -> None:
    cfg = InstanceConfig(name="r", role="router", cpu_cores=(0, 1), kv_send_mode="layerwise",
                         routes={"default": Route(prefill=("p",), decode=("d",)),
                                 "agg": Route(aggregated=("a0", "a1"))})
    back = parse_parameters("r", to_parameters(cfg))
    assert back == cfg
    assert set(back.instance_names) == {"p", "d", "a0", "a1"}
    assert back.threads == 2


@pytest.mark.parametrize(("params", "message"), [
    ({}, "'role' is required"),
    ({"role": "chef"}, "role must be one of"),
    ({"role": "prefill", "max_batch_size": "x"}, "max_batch_size must be an integer"),
    ({"role": "prefill", "max_batch_size": "0"}, "max_batch_size must be positive"),
    ({"role": "prefill", "colour": "red"}, "unknown parameters"),
    ({"role": "router"}, "needs 'routes'"),
    ({"role": "prefill", "admission": "lottery"}, "admission must be one of"),
    ({"role": "prefill", "decode_start": "eventually"}, "decode_start must be one of"),
    ({"role": "prefill", "queue_cap": "4"}, "queue_cap needs admission 'queue'"),
    ({"role": "prefill", "admission": "queue", "queue_cap": "-1"}, "queue_cap must be >= 0"),
    ({"role": "prefill", "warmup_tokens": "-1"}, "warmup_tokens must be >= 0"),
    ({"role": "router", "routes": "{"}, "routes is not JSON"),
    ({"role": "router", "routes": '{"x": {"prefill": ["p"]}}'}, "prefill AND decode"),
    ({"role": "router", "routes": '{"x": {"aggregated": ["a"]}}'}, "'default' scenario"),
])
def test_bad_parameters(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_parameters("m", params)


def test_generation_parameter_is_accepted_and_ignored() -> None:
    # The controller bumps it to make Triton's poll mode reload a model.
    plain = parse_parameters("p", {"role": "prefill"})
    assert parse_parameters("p", {"role": "prefill", "generation": "7"}) == plain


def test_queue_admission_from_spec() -> None:
    spec = {"limits": {"admission": "queue", "queue_cap": 8},
            "scenarios": {"default": {"prefill": 2, "decode": 1}}}
    insts = instances_from_spec(spec)
    assert {(c.admission, c.queue_cap) for c in insts} == {("queue", 8)}
    assert parse_parameters("prefill_0", to_parameters(insts[1])) == insts[1]
    default = instances_from_spec({"scenarios": {"default": {"prefill": 1, "decode": 1}}})
    assert {c.admission for c in default} == {"on_demand"}


def test_decode_start_from_spec_and_per_scenario() -> None:
    spec = {"kv": {"decode_start": "on_commit"},
            "scenarios": {"default": {"prefill": 1, "decode": 1},
                          "fast": {"prefill": 1, "decode": 1, "decode_start": "on_landing"}}}
    insts = {c.name: c for c in instances_from_spec(spec)}
    assert insts["prefill_0"].decode_start == "on_commit"
    assert insts["prefill_1"].decode_start == "on_landing"
    assert parse_parameters("prefill_0", to_parameters(insts["prefill_0"])) == insts["prefill_0"]
    plain = instances_from_spec({"scenarios": {"default": {"prefill": 1, "decode": 1}}})
    assert {c.decode_start for c in plain} == {"on_landing"}


def test_warmup_tokens_from_spec() -> None:
    insts = instances_from_spec({"warmup_tokens": 0,
                                 "scenarios": {"default": {"prefill": 1, "decode": 1}}})
    assert {c.warmup_tokens for c in insts} == {0}
    assert parse_parameters("decode_0", to_parameters(insts[2])) == insts[2]
    plain = instances_from_spec({"scenarios": {"default": {"prefill": 1, "decode": 1}}})
    assert {c.warmup_tokens for c in plain} == {16}


def test_spec_expands_to_instances(tmp_path: Path) -> None:
    instances = build(SPEC, tmp_path / "repo")
    names = [c.name for c in instances]
    assert names == ["pdserve", "prefill_0", "decode_0", "aggregated_0"]
    router = instances[0]
    assert router.routes["default"] == Route(prefill=("prefill_0",), decode=("decode_0",))
    assert router.routes["agg"] == Route(aggregated=("aggregated_0",))
    for cfg in instances:
        text = (tmp_path / "repo" / cfg.name / "config.pbtxt").read_text()
        assert 'backend: "pdserve"' in text and "decoupled: true" in text
        assert (tmp_path / "repo" / cfg.name / "1").is_dir()
    with pytest.raises(FileExistsError):
        write_repository(instances, tmp_path / "repo")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no temp left


def test_spec_pins_cores_per_instance() -> None:
    spec = {"model": "tiny", "scenarios": {"default": {
        "prefill": 2, "decode": 1, "cpu_cores": {"prefill": ["0", "1"], "decode": ["0-1"]}}}}
    insts = {c.name: c for c in instances_from_spec(spec)}
    assert insts["prefill_0"].cpu_cores == (0,)
    assert insts["prefill_1"].cpu_cores == (1,)
    assert insts["decode_0"].cpu_cores == (0, 1)


@pytest.mark.parametrize(("spec", "message"), [
    ({"modle": "tiny"}, "unknown spec keys"),
    ({"scenarios": {"default": {"prefill": 1}}}, "prefill AND decode"),
    ({"scenarios": {"default": {"prefill": -1, "decode": 1}}}, "count >= 0"),
    ({"limits": {"max_tokens": 0}}, "max_tokens_limit must be positive"),
    ({"kv": {"transport": "pigeon"}}, "kv_transport"),
    ({"kv": {"decode_start": "later"}}, "decode_start must be one of"),
    ({"scenarios": {"default": {"prefill": 1, "decode": 1, "decode_start": "x"}}},
     "decode_start must be one of"),
])
def test_bad_specs(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        instances_from_spec(spec)



def test_pool_threads_from_the_launcher_else_tritons_default() -> None:
    assert pool_threads({}) == TRITON_POOL_DEFAULT == 32
    assert pool_threads({POOL_ENV: "528"}) == 528
    for bad in ("many", "16", "-1"):
        with pytest.raises(ValueError, match=POOL_ENV):
            pool_threads({POOL_ENV: bad})


def test_a_router_keeps_its_bls_calls_below_the_pool() -> None:
    assert bls_threads(512, 528) == 512
    assert bls_threads(512, TRITON_POOL_DEFAULT) == TRITON_POOL_DEFAULT - POOL_RESERVE
    assert bls_threads(8, 528) == 8
    assert bls_threads(512, POOL_RESERVE + 1) == 1


def test_launcher_sizes_the_python_backend_pool_and_tells_the_stubs(tmp_path: Path) -> None:
    options = ServerOptions(repository=tmp_path)
    assert options.pool_threads == 512 + POOL_RESERVE  # the default stream_threads fit
    command = TritonServer(replace(options, pool_threads=100)).command(tmp_path)
    # Python-based backends read the "python" entry's pool size, not their own.
    assert "--backend-config=python,thread-pool-size=100" in command
    env = TritonServer(replace(options, pool_threads=100)).environment(tmp_path)
    assert pool_threads(env) == 100  # what the router stub reads
    with pytest.raises(ValueError, match="pool_threads"):
        ServerOptions(repository=tmp_path, pool_threads=POOL_RESERVE)


def test_serve_refuses_a_pool_without_room_for_sends(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    args = parser.parse_args(["--repository", str(tmp_path), "--pool-threads", "8"])
    assert launcher.run(args) == 2
    assert "pool_threads must be above 16" in capsys.readouterr().err
