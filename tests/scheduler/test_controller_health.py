from __future__ import annotations

import pytest

from pdserve.scheduler.controller.health import HealthPolicy, InstanceHealth, ProbeResult
from pdserve.scheduler.instance import InstanceLoad

OK = ProbeResult(ok=True, load=InstanceLoad("prefill_0", "prefill", "default", 4), generation=0)
FAIL = ProbeResult(ok=False, generation=0, error="Stub process 'prefill_0' is not healthy")


def test_two_failed_probes_make_failed_and_the_first_leaves_routing() -> None:
    h = InstanceHealth(HealthPolicy(fail_threshold=2), now=0.0)
    assert h.observe(OK, 0.0) == "healthy" and h.is_routable
    assert h.observe(FAIL, 2.0) == "suspect" and not h.is_routable
    assert h.observe(FAIL, 4.0) == "failed"
    assert h.observe(FAIL, 6.0) == "failed"


def test_suspect_recovers_on_one_good_probe() -> None:
    h = InstanceHealth(HealthPolicy(), now=0.0, state="healthy")
    h.observe(FAIL, 1.0)
    assert h.observe(OK, 2.0) == "healthy" and h.failures == 0


def test_replacing_waits_for_the_new_generation() -> None:
    h = InstanceHealth(HealthPolicy(load_timeout_s=10), now=0.0, state="failed")
    h.begin_replacing(generation=1, now=1.0)
    # The old stub (generation 0) is still loaded: not healthy yet.
    assert h.observe(OK, 2.0) == "replacing"
    assert h.observe(FAIL, 3.0) == "replacing"
    new = ProbeResult(ok=True, load=OK.load, generation=1)
    assert h.observe(new, 4.0) == "healthy"


def test_a_replacement_that_never_loads_fails_after_the_timeout() -> None:
    h = InstanceHealth(HealthPolicy(load_timeout_s=10), now=0.0, state="failed")
    h.begin_replacing(generation=1, now=0.0)
    assert h.observe(FAIL, 5.0) == "replacing"
    assert h.observe(FAIL, 11.0) == "failed"


def test_draining_keeps_probing_and_knows_when_idle() -> None:
    h = InstanceHealth(HealthPolicy(), now=0.0, state="healthy")
    h.begin_draining(1.0)
    busy = ProbeResult(ok=True, load=InstanceLoad("d", "decode", "default", 4, in_flight=3))
    assert h.observe(busy, 2.0) == "draining" and not h.is_idle and not h.is_routable
    assert h.observe(OK, 3.0) == "draining" and h.is_idle
    h.end_draining(4.0)
    assert h.state == "healthy"


def test_a_draining_instance_that_dies_is_failed() -> None:
    h = InstanceHealth(HealthPolicy(fail_threshold=2), now=0.0, state="draining")
    h.observe(FAIL, 1.0)
    assert h.observe(FAIL, 2.0) == "failed"


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="fail_threshold"):
        HealthPolicy(fail_threshold=0)
    with pytest.raises(ValueError, match="probe_interval_s"):
        HealthPolicy(probe_interval_s=0)
