"""``pdserve bench`` against a real tritonserver running the tiny 1P/1D deployment."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.cli import main as pdserve_main
from pdserve.server.launcher import TritonServer
from tests.serving.conftest import start_server
from tests.serving.helpers import scrape

pytestmark = pytest.mark.e2e

KV_INSTANCES = ("prefill_0", "decode_0", "aggregated_0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with start_server("tiny_pd.yaml", tmp_path_factory.mktemp("bench_tiny_pd")) as s:
        yield s


def _kv_in_use(server: TritonServer, timeout_s: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(server.options.metrics_url)
        used = {i: m.get(("pdserve_kv_arena_bytes_in_use", i), -1.0) for i in KV_INSTANCES}
        if all(v == 0 for v in used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.25)


def _bench(server: TritonServer, out: Path, *args: str) -> dict[str, Any]:
    rc = pdserve_main(
        ["bench", "--url", server.options.grpc_url, "--no-progress", "--json", str(out), *args]
    )
    doc: dict[str, Any] = json.loads(out.read_text())
    assert rc == 0, doc["summary"]
    return doc


def test_bench_10_requests_closed_loop(server: TritonServer, tmp_path: Path) -> None:
    doc = _bench(
        server, tmp_path / "c.json", "--concurrency", "4", "--num-requests", "10",
        "--input-len-mean", "48", "--input-len-stddev", "16", "--output-len-mean", "12",
        "--output-len-stddev", "4", "--slo-ttft-ms", "60000", "--scenario", "default",
    )  # fmt: skip
    s = doc["summary"]
    assert (s["num_requests"], s["num_ok"], s["errors_by_kind"]) == (10, 10, {})
    for row in doc["requests"]:
        # ignore_eos + max_tokens: the server returns exactly the asked length.
        assert row["output_tokens"] == row["requested_output_len"], row
        assert row["finish_reason"] == "length"
        assert 0 < row["ttft_ms"] <= row["request_latency_ms"]
    assert s["output_token_throughput"] > 0 and s["request_throughput"] > 0
    assert s["time_to_first_token_ms"]["count"] == 10
    assert s["slo_attainment"] == 1.0
    assert _kv_in_use(server) == dict.fromkeys(KV_INSTANCES, 0)


def test_bench_deadline_cancels_in_flight_and_frees_kv(
    server: TritonServer, tmp_path: Path
) -> None:
    rc = pdserve_main(
        ["bench", "--url", server.options.grpc_url, "--no-progress", "--json",
         str(tmp_path / "d.json"), "--request-rate", "20", "--max-duration-s", "1.5",
         "--input-len-mean", "32", "--output-len-mean", "200"]
    )  # fmt: skip
    doc = json.loads((tmp_path / "d.json").read_text())
    s = doc["summary"]
    assert doc["config"]["mode"] == "request_rate" and doc["config"]["max_duration_s"] == 1.5
    assert s["num_cancelled"] > 0 and set(s["errors_by_kind"]) <= {"DEADLINE"}
    assert rc in (0, 1)  # 1 when no request could finish 200 tokens in 1.5 s
    assert _kv_in_use(server) == dict.fromkeys(KV_INSTANCES, 0)
