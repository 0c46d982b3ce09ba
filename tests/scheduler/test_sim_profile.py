"""Profiles, fitting, configs and the ``pdserve sim`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.errors import InvalidArgument
from pdserve.scheduler.sim.fit import fit_profile, nonneg_lstsq
from pdserve.scheduler.sim.profile import load_profile, save_profile
from pdserve.scheduler.sim.spec import config_from_dict, load_config
from tests.scheduler.sim_helpers import H100, ROOT, profile


def test_profile_round_trips_through_yaml_and_json(tmp_path: Path) -> None:
    p = profile()
    for name in ("p.yaml", "p.json"):
        save_profile(p, tmp_path / name)
        assert load_profile(tmp_path / name) == p


def test_bad_profiles_are_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        load_profile(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(H100.read_text().replace("per_token_s: 3.2e-05", "per_token_s: -1"))
    with pytest.raises(InvalidArgument, match="per_token_s"):
        load_profile(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InvalidArgument):
        load_profile(bad)


def _engine(prefill_len: int, prompt_len: int) -> dict[str, object]:
    # ground truth: prefill 2 ms + 10 us/token + 1e-9 s/t^2; decode 5 ms + 0.1 ms/seq + 1e-7/ctx
    b = 2
    t_pf = 0.002 + 1e-5 * b * prefill_len + 1e-9 * b * prefill_len**2
    steps = 16
    ctx = prompt_len + steps / 2
    step_ms = {str(n): 1e3 * (0.005 + 1e-4 * n + 1e-7 * n * ctx) for n in (1, 8, 32)}
    return {"prefill_batch": b, "prefill_len": prefill_len, "prefill_tok_s": b * prefill_len / t_pf,
            "decode_prompt_len": prompt_len, "decode_steps": steps, "decode_step_ms": step_ms,
            "preset": "synthetic"}


def _kv() -> dict[str, object]:
    runs = {}
    for n in (128, 512, 2048):
        nbytes = n * 1000
        free = 1e-4 + nbytes / 2e9
        fixed = free + n / 16 * 2e-5
        runs[str(n)] = {"nbytes": nbytes, "block_free_s": free, "block_fixed_s": fixed}
    return {"geometry": {"token_bytes": 1000, "layout": {"num_layers": 8}},
            "transports": {"shm": {"no_checksum": runs}}}


def test_fit_recovers_known_coefficients(tmp_path: Path) -> None:
    paths = []
    for k, (pl, dl) in enumerate([(128, 64), (512, 256), (2048, 1024)]):
        paths.append(str(tmp_path / f"e{k}.json"))
        Path(paths[-1]).write_text(json.dumps(_engine(pl, dl)))
    (tmp_path / "kv.json").write_text(json.dumps(_kv()))
    p = fit_profile(paths, str(tmp_path / "kv.json"))
    assert p.prefill.fixed_s == pytest.approx(0.002, rel=1e-6)
    assert p.prefill.per_token_s == pytest.approx(1e-5, rel=1e-6)
    assert p.prefill.per_token2_s == pytest.approx(1e-9, rel=1e-6)
    assert p.decode.fixed_s == pytest.approx(0.005, rel=1e-6)
    assert p.decode.per_seq_s == pytest.approx(1e-4, rel=1e-6)
    assert p.decode.per_ctx_token_s == pytest.approx(1e-7, rel=1e-6)
    assert p.transfer["block_free"].bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert p.transfer["block_fixed"].per_block_s == pytest.approx(2e-5, rel=1e-6)
    assert p.kv_bytes_per_token == 1000 and p.num_layers == 8


def test_nonneg_lstsq_never_returns_negative_terms() -> None:
    import numpy as np

    x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    y = np.array([3.0, 2.0, 1.0])  # falling: the slope would be negative
    coef = nonneg_lstsq(x, y)
    assert (coef >= 0).all() and coef[1] == 0


def test_fit_from_this_repos_benchmarks_when_present(tmp_path: Path) -> None:
    kv = ROOT / "perf" / "kv_transfer_results.json"
    if not kv.is_file():
        pytest.skip("perf/kv_transfer_results.json not generated")
    (tmp_path / "e.json").write_text(json.dumps(_engine(512, 128)))
    p = fit_profile([str(tmp_path / "e.json")], str(kv), "shm")
    assert p.transfer["block_fixed"].per_block_s > 0  # block-fixed measured slower here


def test_config_from_yaml_and_bad_configs(tmp_path: Path) -> None:
    cfg, trace = load_config(ROOT / "perf" / "sim_configs" / "small.yaml")
    assert [s.name for s in cfg.scenarios] == ["chat", "code"] and trace is None
    assert cfg.scenarios[0].load is not None and cfg.scenarios[0].load.day_night is not None
    with pytest.raises(InvalidArgument, match="unknown"):
        config_from_dict({"scenarios": [], "duration_s": 1, "bogus": 1})
    with pytest.raises(InvalidArgument):
        config_from_dict({"duration_s": 10, "scenarios": [{"name": "a", "n_prefill": 1}]})
    doc = {"duration_s": 10, "scenarios": [{"name": "a", "n_prefill": 1, "n_decode": 1,
                                            "replicas": 3}]}
    cfg, _ = config_from_dict(doc)
    assert [s.name for s in cfg.scenarios] == ["a-0", "a-1", "a-2"]


def test_cli_run_then_compare_with_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i * 50, "input_length": 500,
                                         "output_length": 50}) + "\n" for i in range(200)))
    conf = tmp_path / "c.yaml"
    conf.write_text(f"duration_s: 20\nslo: {{ttft_ms: 500}}\ntrace: {{path: {trace}}}\n"
                    "scenarios: [{name: a, n_prefill: 1, n_decode: 1}]\n")
    out = tmp_path / "sim.json"
    assert main(["sim", "run", "--config", str(conf), "--profile", str(H100),
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["num_requests"] == 200 and doc["summary"]["num_ok"] == 200
    assert main(["sim", "compare", str(out), str(out)]) == 0
    text = capsys.readouterr().out
    assert "TTFT p50 (ms)" in text and "+0.0%" in text
    assert main(["sim", "run", "--config", str(tmp_path / "nope.yaml"),
                 "--profile", str(H100)]) == 2
