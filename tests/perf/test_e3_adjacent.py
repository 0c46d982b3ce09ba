from __future__ import annotations

from perf.experiments import e3_adjacent as adj

# E3's 1P3D pinning: prefill_i on core i%2, decode_i on core (i+1)%2.
CORES = {"prefill_0": 0, "decode_0": 1, "decode_1": 0, "decode_2": 1}
HOMES = {"prefill_0": "prefill", "decode_0": "decode", "decode_1": "decode",
         "decode_2": "decode"}


def test_static_ratios_spread_stages_over_cores_and_keep_home_roles() -> None:
    one = adj.spread_roles(CORES, HOMES, 1)
    assert one == HOMES  # 1P3D is the deployment as started
    two = adj.spread_roles(CORES, HOMES, 2)
    assert {CORES[n] for n, r in two.items() if r == "prefill"} == {0, 1}
    assert {CORES[n] for n, r in two.items() if r == "decode"} == {0, 1}
    three = adj.spread_roles(CORES, HOMES, 3)
    assert sorted(three.values()).count("prefill") == 3
    assert {CORES[n] for n, r in three.items() if r == "prefill"} == {0, 1}


def test_flips_never_leave_a_stage_empty() -> None:
    now = {"a": "prefill", "b": "decode", "c": "decode", "d": "decode"}
    target = {"a": "decode", "b": "prefill", "c": "decode", "d": "decode"}
    # a swap: the flip into the smaller stage (b -> prefill) goes first
    assert adj.flips(now, target) == [("b", "prefill"), ("a", "decode")]
    three = {"a": "prefill", "b": "prefill", "c": "prefill", "d": "decode"}
    steps = adj.flips(three, now)
    roles = dict(three)
    for name, role in steps:
        roles[name] = role
        assert {"prefill", "decode"} <= set(roles.values())
    assert roles == now
    assert adj.flips(now, now) == []


def test_verdict_against_the_references_taken_after_each_phase() -> None:
    def row(dep: str, index: int, rps: float, ref: str | None = None) -> dict[str, object]:
        r: dict[str, object] = {"deployment": dep, "phase": "p", "index": index,
                                "req_per_s": rps}
        return r if ref is None else dict(r, reference_for=ref)

    dyn = "dynamic from 1P3D"
    doc = {"rows": [row(dyn, 0, 9.5), row("1P3D", 0, 5.0, dyn), row("2P2D", 0, 10.0, dyn),
                    row("3P1D", 0, 6.0, dyn),
                    row(dyn, 1, 4.0), row("1P3D", 1, 5.0, dyn), row("2P2D", 1, 4.8, dyn),
                    row("3P1D", 1, 4.5, dyn)]}
    lines = adj.verdict(doc)
    assert len(lines) == 2
    assert "best 2P2D 10.00, worst 1P3D 5.00 req/s; 95% of best (goal >= 90%: met)" in lines[0]
    assert "1.90x worst (goal >= 1.6x: met)" in lines[0]
    assert "80% of best (goal >= 90%: NOT met)" in lines[1]
    assert "impossible here: best/worst is only 1.11x" in lines[1]


def _rows(dyn: str, index: int, rps: float,
          refs: dict[str, list[float]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [{"deployment": dyn, "phase": "p", "index": index,
                                      "req_per_s": rps}]
    for dep, values in refs.items():
        for when, value in zip(("before", "after"), values, strict=False):
            rows.append({"deployment": dep, "phase": "p", "index": index, "req_per_s": value,
                         "reference_for": dyn, "reference_when": when})
    return rows


def test_bracketed_references_are_compared_as_the_mean_of_before_and_after() -> None:
    dyn = "dynamic from 1P3D"
    # the machine sped up across the phase: before 8, after 12 for 2P2D
    doc = {"rows": _rows(dyn, 0, 9.2, {"1P3D": [5.0, 7.0], "2P2D": [8.0, 12.0],
                                       "3P1D": [6.0, 6.0]})}
    (fig,) = adj.phase_figures(doc)
    assert fig["refs"] == {"1P3D": 6.0, "2P2D": 10.0, "3P1D": 6.0}
    assert fig["passes"] == 2 and fig["best"] == "2P2D"
    assert abs(fig["of_best"] - 0.92) < 1e-9
    (line,) = adj.verdict(doc)
    assert "mean of before and after" in line and "92% of best (goal >= 90%: met)" in line
    # against the "after" reference alone it would have been a miss (9.2 / 12 = 77%)


def test_summary_takes_the_median_over_runs() -> None:
    dyn = "dynamic from 1P3D"
    docs = [{"rows": _rows(dyn, 0, rps, {"1P3D": [5.0], "2P2D": [10.0], "3P1D": [6.0]})}
            for rps in (7.0, 9.5, 9.1)]
    (line,) = adj.summary(docs)
    assert line.startswith("- phase 0 (p): 70%, 95%, 91% of the best reference in 3 run(s)")
    assert "median 91% (goal >= 90%: met); >= 90% in 2 of 3" in line
    (line,) = adj.summary(docs[:2])
    assert "median 82% (goal >= 90%: NOT met); >= 90% in 1 of 2" in line
