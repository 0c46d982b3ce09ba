from __future__ import annotations

from pathlib import Path

import yaml

from pdserve.server.repo import instances_from_spec
from perf.cancel_drain import KV_INSTANCES, SPEC, gauges_in

E2E_SPEC = Path(__file__).parents[1] / "serving" / "specs" / "tiny_pd.yaml"


def test_spec_is_the_e2e_tests_deployment() -> None:
    """The benchmark measures what test_256_concurrent_streams_in_the_router runs on."""
    assert yaml.safe_load(E2E_SPEC.read_text()) == SPEC
    names = {i.name for i in instances_from_spec(SPEC)}
    assert names == {"pdserve", *KV_INSTANCES}


def test_gauges_sum_the_router_gauge_and_every_arena() -> None:
    text = "\n".join([
        "# HELP pdserve_router_requests_in_flight requests in this router",
        'pdserve_router_requests_in_flight{instance="pdserve",scenario="default"} 200',
        'pdserve_router_requests_in_flight{instance="pdserve",scenario="agg"} 56',
        'pdserve_kv_arena_bytes_in_use{instance="decode_0",scenario="default"} 4096',
        'pdserve_kv_arena_bytes_in_use{instance="aggregated_0",scenario="agg"} 1024',
        'pdserve_kv_arena_bytes_in_use{instance="other_0",scenario="agg"} 9',
        'pdserve_kv_arena_bytes_free{instance="decode_0",scenario="default"} 7',
    ])
    assert gauges_in(text) == (256.0, 5120.0)
    assert gauges_in("") == (0.0, 0.0)
