"""``perf.experiments.cpu_weight``: it toggles only the named roles' cgroups of
its own server, and its summary compares the two weights' means."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.experiments import cpu_weight


def test_only_the_named_roles_of_this_server_are_toggled(tmp_path: Path) -> None:
    for name in ("pdserve-10-decode_0", "pdserve-10-decode_1", "pdserve-10-prefill_0",
                 "pdserve-11-decode_0", "other"):
        (tmp_path / name).mkdir()
    decodes = cpu_weight.groups(tmp_path, 10, {"decode"})
    assert [p.name for p in decodes] == ["pdserve-10-decode_0", "pdserve-10-decode_1"]
    assert cpu_weight.set_weight(decodes, 1, True) == 262144
    assert (decodes[0] / "cpu.shares").read_text() == "262144"
    assert cpu_weight.set_weight(decodes, 2, False) == 100
    assert (decodes[1] / "cpu.weight").read_text() == "100"
    assert not (tmp_path / "pdserve-10-prefill_0" / "cpu.shares").exists()
    with pytest.raises(SystemExit, match="no pdserve-12-"):
        cpu_weight.groups(tmp_path, 12, {"decode"})


def test_the_summary_is_the_mean_per_weight_and_their_ratio() -> None:
    def row(reserved: bool, rps: float, tpot: float) -> dict[str, object]:
        return {"reserved": reserved, "req_per_s": rps, "goodput": rps, "slo_attainment": 1.0,
                "ttft_p50_ms": 50.0, "ttft_p90_ms": 90.0, "tpot_p50_ms": tpot,
                "tpot_p90_ms": tpot}

    s = cpu_weight.summary([row(False, 12.0, 5.0), row(True, 14.0, 4.0),
                            row(True, 13.0, 4.0), row(False, 13.0, 5.5)])
    assert s["default"]["req_per_s"] == 12.5 and s["reserved"]["req_per_s"] == 13.5
    assert s["ratio"]["req_per_s"] == pytest.approx(13.5 / 12.5)
    assert s["ratio"]["tpot_p50_ms"] == pytest.approx(4.0 / 5.25)
