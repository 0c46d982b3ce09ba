"""perf/decode_attention.py on a tiny grid: every mode timed, the ratio it reports."""

from __future__ import annotations

import json
from pathlib import Path

from perf import decode_attention


def test_rows_time_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "da.json"
    assert decode_attention.main(["--presets", "tiny", "--contexts", "16,40", "--batches", "1,3",
                                  "--steps", "1", "--rounds", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["context"], r["batch"]) for r in rows] == [(16, 1), (16, 3), (40, 1), (40, 3)]
    for r in rows:
        assert set(r["step_ms"]) == {"never", "always", "auto"}
        assert all(len(v) == 1 and v[0] > 0 for v in r["steps_ms"].values())
        assert r["per_sequence_over_batched"] == r["step_ms"]["never"] / r["step_ms"]["always"]
