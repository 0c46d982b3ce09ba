"""perf/gpu_profile.py on the CPU: its files are what `pdserve sim profile` fits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdserve.scheduler.sim.fit import fit_profile
from perf import gpu_profile


def test_files_fit_a_profile(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    assert gpu_profile.main([
        "--out", str(out), "--device", "cpu", "--geometry", "small", "--dtype", "float32",
        "--prefill-lens", "32,96", "--decode-prompt-lens", "16,64", "--decode-batches", "1,3",
        "--decode-steps", "2", "--kv-lengths", "20,64", "--repeats", "1", "--skip-check",
    ]) == 0
    kv = json.loads((out / "kv_d2d.json").read_text())
    rows = kv["transports"]["cuda_d2d"]["no_checksum"]
    layers = gpu_profile.GEOMETRIES["small"].num_layers
    # 20 tokens: two pages (16 + 4) of K and of V per layer.
    assert rows["20"]["pages"] == layers * 2 * 2 and rows["64"]["pages"] == layers * 2 * 4
    assert rows["64"]["nbytes"] == 64 * kv["geometry"]["token_bytes"]
    for row in rows.values():
        assert all(row[k] > 0 for k in ("block_free_s", "block_free_layerwise_s",
                                         "block_fixed_s", "block_fixed_acked_s"))
    engines = sorted(out.glob("engine_*.json"))
    assert len(engines) == 2
    doc = json.loads(engines[1].read_text())
    assert doc["prefill_len"] == 96 and doc["decode_prompt_len"] == 64
    assert set(doc["decode_step_ms"]) == {"1", "3"}
    assert set(doc["decode_step_ms_per_sequence_attention"]) == {"3"}
    profile = fit_profile([str(p) for p in engines], str(out / "kv_d2d.json"),
                          transport="cuda_d2d")
    assert profile.num_layers == layers
    assert profile.kv_bytes_per_token == kv["geometry"]["token_bytes"]
    summary = json.loads((out / "summary.json").read_text())
    assert [e["prefill_len"] for e in summary["engines"]] == [32, 96]


def test_block_fixed_pages_land_where_the_pool_says() -> None:
    """kv_copies checks every page against its slice of the request's KV (it raises
    otherwise); the page count covers a ragged tail."""
    rows = gpu_profile.kv_copies(torch.device("cpu"), torch.float32, layers=2, kv_heads=2,
                                 head_dim=4, tokens=33, repeats=1)
    assert rows["pages"] == 2 * 2 * 3  # 16 + 16 + 1 tokens


def test_same_tokens_on_the_same_device() -> None:
    check = gpu_profile.check_tokens(torch.device("cpu"), presets=("tiny",))
    assert check["tiny"]["same"] == check["tiny"]["tokens"] == 8 * 24
    assert check["tiny"]["identical_sequences"] == 8
