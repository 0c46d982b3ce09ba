"""Smoke test of perf/engine.py on the tiny preset with very few iterations."""

from __future__ import annotations

import json
from pathlib import Path

from perf.engine import main


def test_engine_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    rc = main(["--preset", "tiny", "--prefill-batch", "2", "--prefill-len", "16",
               "--decode-batches", "1,2", "--decode-steps", "2", "--repeats", "1",
               "--gemm-n", "128", "--memcpy-mb", "4", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("prefill_tok_s", "hf_prefill_tok_s", "prefill_mfu", "matmul_peak_flops",
                "memcpy_bytes_per_s"):
        assert r[key] > 0, key
    for key in ("decode_tok_s", "hf_decode_tok_s", "decode_bw_util"):
        assert set(r[key]) == {"1", "2"} and all(v > 0 for v in r[key].values()), key
    assert r["machine"]["threads"] == 2 and r["date"]
