"""Smoke test of perf.kv_transfer with tiny sizes: it runs, and its JSON says what it claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perf import kv_transfer


def test_kv_transfer_bench_smoke(tmp_path: Path) -> None:
    out, png = tmp_path / "kv.json", tmp_path / "kv.png"
    assert kv_transfer.main(["--json", str(out), "--plot", str(png), "--lengths", "16,64",
                             "--transports", "shm,tcp", "--repeats", "3",
                             "--overlap-model", "tiny", "--overlap-lengths", "16,64",
                             "--overlap-repeats", "1"]) == 0
    result = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert set(result["limits"]) == {"16", "64"}
    assert set(result["transports"]["shm"]) == {"checksum", "checksum_at_end", "no_checksum"}
    assert set(result["transports"]["tcp"]) == {"checksum", "no_checksum"}
    for kind in ("shm", "tcp"):
        for variant, rows in result["transports"][kind].items():
            for tp in ("16", "64"):
                row = rows[tp]
                assert row["nbytes"] == result["limits"][tp]["nbytes"], variant
                for key in ("block_free_s", "block_free_layerwise_s", "block_fixed_s"):
                    assert row[key] > 0
                assert row["gbps"] == row["nbytes"] / row["block_free_s"] / 1e9
                assert row["ratio_free_over_fixed"] == row["block_free_s"] / row["block_fixed_s"]
                assert row["limit"] == {"shm": "memcpy", "tcp": "raw_tcp"}[kind]
                assert row["of_limit"] == pytest.approx(row["gbps"] / row["limit_gbps"])
        for tp in ("16", "64"):
            row = result["overlap"]["transports"][kind][tp]
            for mode in ("whole", "layerwise_inline", "layerwise_background"):
                run = row[mode]
                assert 0 < run["prefill_s"] < run["total_s"]
                assert run["exposed_s"] > 0
            assert row["saving_exposed_s"] == (row["whole"]["exposed_s"]
                                               - row["layerwise_background"]["exposed_s"])
    assert not result["goals"]  # goals are judged at >= 512 tokens only
