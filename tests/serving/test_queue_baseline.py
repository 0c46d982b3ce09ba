"""The local-queue baseline (``admission: queue``) and the heartbeat, on a real tritonserver.

Prefills have a batch of ONE and a local FIFO of 32: a burst of 12 concurrent
requests must queue there (no prefill rejection at all, unlike on-demand
forwarding with the same batch) and produce the same greedy text as the
offline engine. The controller's heartbeat (``TritonProbeClient``) answers on
prefill, decode and aggregated instances with their real load.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.server.launcher import TritonServer
from tests.serving.conftest import start_server
from tests.serving.helpers import generate_many, scrape

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_server("tiny_queue.yaml", tmp_path_factory.mktemp("tiny_queue"))
    with server:
        yield server


def test_burst_queues_at_prefills_without_rejection(queue_server: TritonServer) -> None:
    engine = LLMEngine.load("tiny")
    prompts = [list(range(3, 40 + 7 * i)) for i in range(12)]
    results = generate_many(queue_server.options.grpc_url, [
        {"ids": p, "sampling": {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}}
        for p in prompts])
    for prompt, res in zip(prompts, results, strict=True):
        assert res.error is None, res.error
        want = generate(engine, [prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert res.ids == want
    metrics = scrape(queue_server.options.metrics_url)
    rejections = {inst: v for (name, inst), v in metrics.items()
                  if name == "pdserve_prefill_rejections_total"}
    assert set(rejections) >= {"prefill_0", "prefill_1"}
    assert sum(rejections.values()) == 0  # a queue takes what on-demand would refuse


def test_heartbeat_reports_load_of_every_instance(queue_server: TritonServer) -> None:
    probe = TritonProbeClient(timeout_s=5.0)
    http = queue_server.options.http_url
    expect = {"prefill_0": "prefill", "prefill_1": "prefill", "decode_0": "decode",
              "aggregated_0": "aggregated"}
    for name, role in expect.items():
        result = probe.probe(http, name)
        assert result.ok, result.error
        assert result.load is not None and result.load.name == name
        assert result.load.role == role
        assert result.load.scenario == ("agg" if role == "aggregated" else "default")
        assert result.load.max_batch_size == 1
        assert result.load.in_flight == 0 and result.load.queued == 0
        assert 0 < result.load.kv_free_bytes == result.load.kv_total_bytes
    assert not probe.probe(http, "pdserve").ok  # the router is not an instance
