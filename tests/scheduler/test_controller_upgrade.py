"""Rolling upgrade with a fake Triton whose poll runs on every fake sleep."""

from __future__ import annotations

from pathlib import Path

from pdserve.scheduler.controller.health import ProbeResult
from pdserve.scheduler.controller.state import read_state
from pdserve.scheduler.controller.upgrade import RollingUpgrade, UpgradeOptions
from tests.scheduler.controller_fakes import FakeTriton, make_repo


class Recorder(FakeTriton):
    """Records, at every probe, which instances are drained and on which model."""

    def __init__(self, *args: object, state_path: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.state_path = state_path
        self.max_drained = 0
        self.fail_model: str | None = None

    def probe(self, server: str, model: str) -> ProbeResult:
        drained = read_state(self.state_path).draining
        self.max_drained = max(self.max_drained, len(drained))
        entry = self.repo.instances()[model]
        if self.fail_model is not None and entry.model == self.fail_model:
            self.broken.add(model)
        return super().probe(server, model)


def make(tmp_path: Path) -> tuple[RollingUpgrade, Recorder, list[float]]:
    repo = make_repo(tmp_path)
    triton = Recorder(repo, state_path=tmp_path / "state.json")
    clock = [0.0]

    def sleep(s: float) -> None:
        clock[0] += s
        triton.in_flight.clear()  # in-flight work finishes while we wait
        triton.poll()

    options = UpgradeOptions(servers=("s0",), state_path=tmp_path / "state.json",
                             drain_timeout_s=10, check_timeout_s=20, poll_interval_s=1)
    return RollingUpgrade(repo, triton, options, clock=lambda: clock[0], sleep=sleep), triton, clock


def test_upgrade_goes_one_instance_at_a_time(tmp_path: Path) -> None:
    upgrade, triton, _ = make(tmp_path)
    triton.in_flight["decode_0"] = 2  # must finish before decode_0 is reloaded
    report = upgrade.run("tiny-v2")
    # Prefills and decodes alternate, so an old or a new P/D pair always serves.
    assert report.ok and report.upgraded == ["prefill_0", "decode_0", "prefill_1", "decode_1"]
    assert triton.max_drained == 1  # never two out of routing at once
    for name, entry in upgrade.repo.instances().items():
        assert entry.params["model"] == "tiny-v2" and entry.generation == 1, name
        assert triton.loaded[name] == 1
    assert read_state(tmp_path / "state.json").draining == {}
    kinds = [(e.kind, e.model) for e in upgrade.repo.edits]
    assert kinds == [("set_model", n) for n in report.upgraded]
    # Re-running finds everything current and edits nothing.
    again = upgrade.run("tiny-v2")
    assert again.ok and again.upgraded == [] and len(again.skipped) == 4
    assert len(upgrade.repo.edits) == 4


def test_upgrade_waits_for_in_flight_before_the_edit(tmp_path: Path) -> None:
    upgrade, triton, clock = make(tmp_path)
    triton.in_flight["decode_0"] = 1
    edit_times: list[float] = []
    original = upgrade.repo.set_model

    def spy(name: str, model: str, reason: str, role: str = ""):
        edit_times.append(clock[0])
        assert triton.in_flight.get(name, 0) == 0
        return original(name, model, reason, role)

    upgrade.repo.set_model = spy
    assert upgrade.run("tiny-v2", ["decode_0"]).ok
    assert edit_times == [1.0]  # one poll interval: the request finished, then the edit


def test_upgrade_aborts_on_a_failed_check(tmp_path: Path) -> None:
    upgrade, triton, _ = make(tmp_path)
    triton.fail_model = "broken-weights"
    report = upgrade.run("broken-weights")
    assert not report.ok and report.failed == "prefill_0"
    assert "failed its check" in report.error and report.upgraded == []
    # Only the first instance was touched; it stays drained, the rest keep old weights.
    models = {n: e.model for n, e in upgrade.repo.instances().items()}
    assert models["prefill_0"] == "broken-weights"
    assert {models[n] for n in ("decode_0", "decode_1", "prefill_1")} == {"tiny"}
    assert set(read_state(tmp_path / "state.json").draining) == {"prefill_0"}


def test_unknown_instance_is_reported(tmp_path: Path) -> None:
    upgrade, _, _ = make(tmp_path)
    report = upgrade.run("tiny-v2", ["nope"])
    assert not report.ok and "not an instance" in report.error
    assert upgrade.repo.edits == []


def test_upgrade_keeps_the_roles_switched_in_place(tmp_path: Path) -> None:
    """decode_1 serves prefill (switched in place by the controller): it is upgraded
    as a prefill and its reload keeps that role, so the ratio and the old/new pair
    order hold."""
    from pdserve.scheduler.controller.state import (
        ControllerState,
        InstanceStatus,
        update_state,
    )

    upgrade, triton, _ = make(tmp_path)
    triton.acting["decode_1"] = "prefill"
    status = InstanceStatus(role="prefill", scenario="default", state="healthy",
                            routable=True, acting_role="prefill")
    update_state(tmp_path / "state.json",
                 lambda s: ControllerState(0.0, {"decode_1": status}, {}, {}))
    report = upgrade.run("tiny-v2")
    # 3 prefills (decode_1, prefill_0, prefill_1) and 1 decode, alternated.
    assert report.ok and report.upgraded == ["decode_1", "decode_0", "prefill_0", "prefill_1"]
    assert upgrade.repo.entry("decode_1").role == "prefill"
    assert upgrade.repo.entry("decode_0").role == "decode"
    assert triton.acting == {}  # every stub reloaded, each in the role it served


def test_a_rerun_after_a_failed_check_puts_the_instance_back_and_goes_on(
        tmp_path: Path) -> None:
    """The check failed (say loading took longer than --check-timeout-s) and left
    prefill_0 drained; it loaded later. The re-run skips it as current: it must
    lift that drain before draining the next one (it left prefill_0 drained for
    good and then drained prefill_1 too: no prefill routable)."""
    upgrade, triton, _ = make(tmp_path)
    triton.broken.add("prefill_0")
    first = upgrade.run("tiny-v2")
    assert not first.ok and first.failed == "prefill_0"
    assert set(read_state(tmp_path / "state.json").draining) == {"prefill_0"}
    triton.broken.discard("prefill_0")
    triton.max_drained = 0
    again = upgrade.run("tiny-v2")
    assert again.ok and again.skipped == ["prefill_0"]
    assert again.upgraded == ["decode_0", "prefill_1", "decode_1"]
    assert read_state(tmp_path / "state.json").draining == {}
    assert triton.max_drained == 1
