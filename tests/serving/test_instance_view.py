"""The router's instance view: roles from the repository, routability from the
controller's state file and heartbeats, loads corrected by the router's own calls."""

from __future__ import annotations

import time
from pathlib import Path

from pdserve.roles.instance_view import InstanceView
from pdserve.scheduler.controller.repository import Repository
from pdserve.scheduler.controller.state import (
    ControllerState,
    DrainRequest,
    InstanceStatus,
    default_state_path,
    update_state,
    with_drain,
)
from pdserve.scheduler.decode_choice import rank_decodes
from pdserve.scheduler.forwarding import rank_prefills
from pdserve.scheduler.instance import InstanceLoad
from pdserve.server.config import Route
from pdserve.server.repo import instances_from_spec, write_repository

SPEC = {"limits": {"max_batch_size": 4},
        "scenarios": {"default": {"prefill": 2, "decode": 2}, "agg": {"aggregated": 1}}}


def _view(tmp_path: Path) -> tuple[InstanceView, Path]:
    repo = write_repository(instances_from_spec(SPEC), tmp_path / "repo")
    return InstanceView({"default": Route(prefill=("x",), decode=("y",))}, 4, repo,
                        check_every_s=0.0), repo


def test_roles_come_from_the_repository_and_follow_a_switch(tmp_path: Path) -> None:
    view, repo = _view(tmp_path)
    assert view.group("default", "prefill") == ["prefill_0", "prefill_1"]
    assert view.group("default", "decode") == ["decode_0", "decode_1"]
    assert view.is_aggregated("agg") and not view.is_aggregated("default")
    Repository(repo).switch_role("prefill_1", "decode", "test")
    time.sleep(0.01)
    view.refresh()
    assert view.group("default", "prefill") == ["prefill_0"]
    assert view.group("default", "decode") == ["decode_0", "decode_1", "prefill_1"]
    # Until its reloaded stub answers as a decode, the switched instance gets no work.
    view.record_load("prefill_1", InstanceLoad("prefill_1", "prefill", "default", 4))
    assert [x.name for x in view.loads("default", "decode") if x.is_routable] == [
        "decode_0", "decode_1"]
    view.record_load("prefill_1", InstanceLoad("prefill_1", "decode", "default", 4,
                                               kv_free_bytes=100, kv_total_bytes=100))
    assert "prefill_1" in rank_decodes(view.loads("default", "decode"), 10)


def _acting(repo: Path, name: str, acting_role: str) -> None:
    status = InstanceStatus(role=acting_role or "decode", scenario="default", state="healthy",
                            routable=True, acting_role=acting_role)
    update_state(default_state_path(repo),
                 lambda s: ControllerState(s.updated_at, {**s.instances, name: status},
                                           s.ratios, s.draining))


def test_a_role_switched_in_place_counts_once_the_heartbeat_agrees(tmp_path: Path) -> None:
    view, repo = _view(tmp_path)
    view.record_load("decode_1", InstanceLoad("decode_1", "decode", "default", 4))
    _acting(repo, "decode_1", "prefill")
    view.refresh(force=True)
    # The controller says prefill, the instance's last answer says decode: decode still.
    assert view.group("default", "prefill") == ["prefill_0", "prefill_1"]
    assert "decode_1" in view.group("default", "decode")
    view.record_load("decode_1", InstanceLoad("decode_1", "prefill", "default", 4))
    assert view.group("default", "prefill") == ["decode_1", "prefill_0", "prefill_1"]
    assert view.group("default", "decode") == ["decode_0"]
    assert "decode_1" in rank_prefills(view.loads("default", "prefill"))
    # A stale acting role (controller gone; instance reloaded in its home role):
    # the heartbeat in the repository's role wins.
    view.record_load("decode_1", InstanceLoad("decode_1", "decode", "default", 4,
                                              kv_free_bytes=100, kv_total_bytes=100))
    assert view.group("default", "decode") == ["decode_0", "decode_1"]
    assert "decode_1" in rank_decodes(view.loads("default", "decode"), 10)


def test_drained_and_failed_instances_leave_routing(tmp_path: Path) -> None:
    view, repo = _view(tmp_path)
    update_state(default_state_path(repo),
                 lambda s: with_drain(s, "prefill_0", DrainRequest("upgrade", "test", 0.0)))
    view.refresh()
    assert rank_prefills(view.loads("default", "prefill")) == ["prefill_1"]
    view.record_failure("prefill_1", "token channel closed")
    assert rank_prefills(view.loads("default", "prefill")) == []
    view.record_load("prefill_1", InstanceLoad("prefill_1", "prefill", "default", 4))
    assert rank_prefills(view.loads("default", "prefill")) == ["prefill_1"]


def test_loads_count_this_routers_calls_since_the_last_report(tmp_path: Path) -> None:
    view, _ = _view(tmp_path)
    for name in ("decode_0", "decode_1"):
        view.record_load(name, InstanceLoad(name, "decode", "default", 4,
                                            kv_free_bytes=1000, kv_total_bytes=1000))
    decode_call = view.started("decode_0", kv_bytes=600)
    assert rank_decodes(view.loads("default", "decode"), 100) == ["decode_1", "decode_0"]
    assert rank_decodes(view.loads("default", "decode"), 500) == ["decode_1"]
    prefill_call = view.started("prefill_0")
    assert rank_prefills(view.loads("default", "prefill")) == ["prefill_1", "prefill_0"]
    view.finished(prefill_call)
    view.finished(decode_call)
    assert view.local_in_flight("prefill_0") == 0 == view.local_in_flight("decode_0")
    # its KV is back before any report says so
    assert rank_decodes(view.loads("default", "decode"), 500) == ["decode_0", "decode_1"]


def _kv_free(view: InstanceView, name: str) -> int:
    return next(load.kv_free_bytes for load in view.loads("default", "decode")
                if load.name == name)


def test_kv_of_a_call_that_ended_is_free_again_before_the_next_report(tmp_path: Path) -> None:
    view, _ = _view(tmp_path)

    def report(name: str, free: int) -> None:
        view.record_load(name, InstanceLoad(name, "decode", "default", 4,
                                            kv_free_bytes=free, kv_total_bytes=1000))

    report("decode_0", 1000)
    report("decode_1", 1000)
    # A call that starts and ends between two reports: its reservation is undone.
    short = view.started("decode_0", kv_bytes=300)
    assert _kv_free(view, "decode_0") == 700
    view.finished(short)
    assert _kv_free(view, "decode_0") == 1000
    # A call the next report counted (free 600 there): its end gives the 400 back on
    # top of the report, so the instance it left is the emptier one at once.
    long = view.started("decode_0", kv_bytes=400)
    view.started("decode_1", kv_bytes=200)
    report("decode_0", 600)
    report("decode_1", 800)
    assert rank_decodes(view.loads("default", "decode"), 100) == ["decode_1", "decode_0"]
    view.finished(long)
    assert _kv_free(view, "decode_0") == 1000
    assert rank_decodes(view.loads("default", "decode"), 100) == ["decode_0", "decode_1"]
    # The next report is the truth again; the view never claims more than the total.
    report("decode_0", 900)  # another router's request arrived meanwhile
    assert _kv_free(view, "decode_0") == 900
    view.finished(view.started("decode_0", kv_bytes=0))
    assert _kv_free(view, "decode_0") == 900
    stale = view.started("decode_0", kv_bytes=500)
    report("decode_0", 900)  # a report that came before the instance reserved it
    view.finished(stale)
    assert _kv_free(view, "decode_0") == 1000


def test_an_instance_is_full_here_only_when_this_routers_calls_hold_every_slot(
        tmp_path: Path) -> None:
    view, _ = _view(tmp_path)  # max_batch_size 4 from the repository
    for _ in range(3):
        view.started("prefill_0")
    assert not view.is_full_here("prefill_0")
    view.started("prefill_0")
    assert view.is_full_here("prefill_0")
    # A heartbeat's slot count wins over the repository's; other routers' calls
    # in the report do not make it full here (they may have ended since).
    view.record_load("prefill_0", InstanceLoad("prefill_0", "prefill", "default", 6,
                                               in_flight=6))
    assert not view.is_full_here("prefill_0")
    view.started("prefill_0")
    call = view.started("prefill_0")
    assert view.is_full_here("prefill_0")
    view.finished(call)
    assert not view.is_full_here("prefill_0")
    assert not view.is_full_here("prefill_1") and not view.is_full_here("unknown")


def test_without_repository_routes_are_the_roles() -> None:
    view = InstanceView({"default": Route(prefill=("p",), decode=("d",)),
                         "agg": Route(aggregated=("a",))}, 8)
    assert view.group("default", "prefill") == ["p"] and view.is_aggregated("agg")
    assert view.loads("default", "decode")[0].is_routable


def test_a_stub_seen_failed_or_replaced_is_gone_for_calls_sent_before(tmp_path: Path) -> None:
    view, _ = _view(tmp_path)
    beat = InstanceLoad("prefill_0", "prefill", "default", 4, incarnation="aaaa")
    view.record_load("prefill_0", beat)
    sent = view.epoch("prefill_0")
    view.record_load("prefill_0", beat)  # the same stub answers again: still there
    assert not view.is_gone_since("prefill_0", sent)
    # Restarted in place between two heartbeats: no failure was seen, but another
    # stub answers, so a call made to the old one will never be answered.
    view.record_load("prefill_0", InstanceLoad("prefill_0", "prefill", "default", 4,
                                               incarnation="bbbb"))
    assert view.is_gone_since("prefill_0", sent)
    assert rank_prefills(view.loads("default", "prefill"))[0] == "prefill_0"  # routable again
    # A failure seen and cleared by a good heartbeat of the same stub still counts.
    sent = view.epoch("prefill_1")
    view.record_failure("prefill_1", "heartbeat: Stub process 'prefill_1' is not healthy")
    view.record_load("prefill_1", InstanceLoad("prefill_1", "prefill", "default", 4))
    assert view.is_gone_since("prefill_1", sent)
    assert not view.is_gone_since("prefill_1", view.epoch("prefill_1"))
