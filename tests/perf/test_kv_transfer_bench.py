"""Smoke test of perf.kv_transfer with tiny sizes: it runs, and its JSON says what it claims."""

from __future__ import annotations

import json
from pathlib import Path

from perf import kv_transfer


def test_kv_transfer_bench_smoke(tmp_path: Path) -> None:
    out, png = tmp_path / "kv.json", tmp_path / "kv.png"
    assert kv_transfer.main(["--json", str(out), "--plot", str(png), "--lengths", "16,64",
                             "--transports", "shm,tcp", "--repeats", "3"]) == 0
    result = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert set(result["limits"]) == {"16", "64"}
    for kind in ("shm", "tcp"):
        for variant in ("checksum", "no_checksum"):
            for tp in ("16", "64"):
                row = result["transports"][kind][variant][tp]
                assert row["nbytes"] == result["limits"][tp]["nbytes"]
                for key in ("block_free_s", "block_free_layerwise_s", "block_fixed_s"):
                    assert row[key] > 0
                assert row["gbps"] == row["nbytes"] / row["block_free_s"] / 1e9
                assert row["ratio_free_over_fixed"] == row["block_free_s"] / row["block_fixed_s"]
    assert any(key.endswith("shm>=0.7*memcpy") for key in result["goals"])
