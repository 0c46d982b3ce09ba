from __future__ import annotations

import pytest

from pdserve.errors import InvalidArgument
from pdserve.scheduler.controller.probe import ServerAddress
from pdserve.scheduler.controller.protocol import (
    ControlCall,
    RouterLoad,
    answer_health,
    answer_router_health,
    parse_health_reply,
    parse_router_reply,
)
from pdserve.scheduler.controller.signals import scenario_signal, totals_from_text, window
from pdserve.scheduler.controller.state import ControllerState, read_state
from pdserve.scheduler.instance import InstanceLoad

PAGE = """\
# TYPE pdserve_time_to_first_token_seconds histogram
pdserve_time_to_first_token_seconds_bucket{{instance="pdserve",le="+Inf"}} {n}
pdserve_time_to_first_token_seconds_sum{{instance="pdserve"}} {ttft}
pdserve_time_to_first_token_seconds_count{{instance="pdserve"}} {n}
# TYPE pdserve_time_per_output_token_seconds histogram
pdserve_time_per_output_token_seconds_sum{{instance="pdserve"}} {tpot}
pdserve_time_per_output_token_seconds_count{{instance="pdserve"}} {n}
# TYPE pdserve_generated_tokens_total counter
pdserve_generated_tokens_total{{instance="pdserve"}} {gen}
"""


def page(n: int, ttft: float, tpot: float, gen: int) -> str:
    return PAGE.format(n=n, ttft=ttft, tpot=tpot, gen=gen)


def test_window_from_two_scrapes_of_two_servers() -> None:
    prev = totals_from_text([page(10, 1.0, 0.1, 100)] * 2, 0.0, {}, ["default"])
    cur = totals_from_text([page(30, 5.0, 0.5, 500)] * 2, 10.0, {}, ["default"])
    w = window(prev, cur, "default")
    assert w is not None
    assert w.requests == 40 and w.arrival_rate == pytest.approx(4.0)
    assert w.ttft_s == pytest.approx(8.0 / 40) and w.tpot_s == pytest.approx(0.8 / 40)
    assert w.output_tokens == pytest.approx(20.0)
    sig = scenario_signal(w, 10.0, 2, 2, prefill_batch=8, decode_batch=16)
    assert sig is not None
    assert sig.prefill.requests_per_s == pytest.approx(8 / 0.2)
    # A decode slot is held from the reservation (before the prefill) to the end.
    assert sig.decode.batch_time_s == pytest.approx(0.2 + 0.02 * 19)
    assert sig.ttft_share == pytest.approx(0.2 / (0.2 + 0.02 * 19))


def test_no_traffic_or_a_restarted_server_gives_no_window() -> None:
    a = totals_from_text([page(10, 1.0, 0.1, 100)], 0.0, {}, ["default"])
    assert window(a, totals_from_text([page(10, 1.0, 0.1, 100)], 5.0, {}, ["default"]),
                  "default") is None
    assert window(a, totals_from_text([page(2, 0.1, 0.01, 9)], 5.0, {}, ["default"]),
                  "default") is None


def offered_and(off: float, counter: str, value: float, instances: tuple[str, ...]) -> str:
    """/metrics text: the router's offered counter, and ``counter`` on each instance."""
    lines = ["# TYPE pdserve_requests_offered_total counter",
             f'pdserve_requests_offered_total{{instance="pdserve",scenario="default"}} {off}',
             f"# TYPE {counter} counter"]
    lines += [f'{counter}{{instance="{i}",scenario="default"}} {value}' for i in instances]
    return "\n".join(lines) + "\n"


def test_offered_requests_drive_the_arrival_rate_and_tokens_count_once() -> None:
    decodes = {"decode_0": "default"}
    gen = "pdserve_generated_tokens_total"
    prev = totals_from_text([page(10, 1.0, 0.1, 100) + offered_and(10, gen, 100, ("decode_0",))],
                            0.0, decodes, ["default"])
    # 50 more offered, only 20 got a first token: the rest were shed (UNAVAILABLE).
    cur = totals_from_text([page(30, 5.0, 0.5, 500) + offered_and(60, gen, 500, ("decode_0",))],
                           10.0, decodes, ["default"])
    w = window(prev, cur, "default")
    assert w is not None and w.requests == 20 and w.offered == 50
    assert w.arrival_rate == pytest.approx(5.0)
    assert w.output_tokens == pytest.approx(400 / 20)  # the decode's own count is not added


def test_the_output_length_asked_for_is_the_routers_per_offered_request() -> None:
    """``requested_tokens``: the router's max_tokens counter over its offered count,
    a decode's series of the same name ignored (the router counts each request once);
    None from a router that does not count it."""
    decodes, both = {"decode_0": "default"}, ("pdserve", "decode_0")
    req = "pdserve_requested_output_tokens_total"
    prev = totals_from_text([page(10, 1.0, 0.1, 100) + offered_and(10, req, 40, both)], 0.0,
                            decodes, ["default"])
    cur = totals_from_text([page(30, 5.0, 0.5, 500) + offered_and(60, req, 840, both)], 10.0,
                           decodes, ["default"])
    w = window(prev, cur, "default")
    assert w is not None and w.requested_tokens == pytest.approx(800 / 50)
    sig = scenario_signal(w, 10.0, 2, 2, prefill_batch=8, decode_batch=16)
    assert sig is not None and sig.requested_tokens == pytest.approx(16.0)
    old = window(totals_from_text([page(10, 1.0, 0.1, 100)], 0.0, {}, ["default"]),
                 totals_from_text([page(30, 5.0, 0.5, 500)], 10.0, {}, ["default"]), "default")
    assert old is not None and old.requested_tokens is None


def test_unlabelled_router_series_are_dropped_with_several_scenarios() -> None:
    t = totals_from_text([page(10, 1.0, 0.1, 100)], 0.0, {}, ["a", "b"])
    assert t.values == {}
    labelled = page(10, 1.0, 0.1, 100).replace('instance="pdserve"',
                                                'instance="pdserve",scenario="b"')
    t = totals_from_text([labelled], 0.0, {}, ["a", "b"])
    assert t.get("b", "ttft_count") == 10 and t.get("a", "ttft_count") == 0


def test_heartbeat_contract_round_trip() -> None:
    assert ControlCall.from_bytes(ControlCall().to_bytes()) == ControlCall()
    load = InstanceLoad("decode_0", "decode", "default", 8, in_flight=3)
    assert parse_health_reply(answer_health(load), "decode_0") == load
    with pytest.raises(InvalidArgument, match="answered by"):
        parse_health_reply(answer_health(load), "decode_1")
    with pytest.raises(InvalidArgument):
        ControlCall.from_bytes(b'{"op": "reboot"}')
    with pytest.raises(InvalidArgument):
        ControlCall.from_bytes(b"not json")


def test_router_heartbeat_contract() -> None:
    load = RouterLoad("pdserve", incarnation="ab12", in_flight=5)
    reply = answer_router_health(ControlCall(), load)
    assert parse_router_reply(reply, "pdserve") == load
    with pytest.raises(InvalidArgument, match="answered by"):
        parse_router_reply(reply, "pdserve_b")
    with pytest.raises(InvalidArgument, match="only the 'health'"):
        answer_router_health(ControlCall("set_role", "decode"), load)  # routers never switch
    # An instance's answer is not a router's, and a router's is not an instance's.
    instance = answer_health(InstanceLoad("pdserve", "decode", "default", 8))
    with pytest.raises(InvalidArgument, match="not a router"):
        parse_router_reply(instance, "pdserve")
    with pytest.raises(InvalidArgument):
        parse_health_reply(reply, "pdserve")
    for bad in (b"not json", b'{"role": "router"}', b'{"role": "router", "name": ""}',
                b'{"role": "router", "name": "pdserve", "in_flight": -1}',
                b'{"role": "router", "name": "pdserve", "in_flight": true}'):
        with pytest.raises(InvalidArgument):
            parse_router_reply(bad, "pdserve")


def test_set_role_contract() -> None:
    call = ControlCall("set_role", "decode")
    assert call.to_bytes() == b'{"op":"set_role","role":"decode"}'
    assert ControlCall.from_bytes(call.to_bytes()) == call
    assert ControlCall().to_bytes() == b'{"op":"health"}'  # what older instances parse
    for bad in (b'{"op": "set_role"}', b'{"op": "set_role", "role": "router"}',
                b'{"op": "health", "role": "decode"}', b'{"op": "set_role", "role": 3}',
                b'{"op": "set_role", "role": "decode", "force": "yes"}'):
        with pytest.raises(InvalidArgument):
            ControlCall.from_bytes(bad)


def test_server_address_and_state_file_errors(tmp_path) -> None:
    a = ServerAddress.parse("127.0.0.1:8000")
    assert a.http == "127.0.0.1:8000" and a.metrics_url == "http://127.0.0.1:8002/metrics"
    assert ServerAddress.parse("h:1:9").metrics_port == 9
    with pytest.raises(InvalidArgument):
        ServerAddress.parse("nohost")
    assert read_state(tmp_path / "absent.json") == ControllerState()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidArgument, match="malformed"):
        read_state(tmp_path / "bad.json")
