"""A real tritonserver per test module, on a repository generated from a spec.

The fixture picks free ports, waits until every model is READY and ALWAYS
stops the server and its stubs (also when the test fails).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pdserve.server.launcher import ServerOptions, TritonServer, free_port
from pdserve.server.repo import build, instances_from_spec, write_repository

SPECS = Path(__file__).parent / "specs"


def start_server(spec: str, tmp: Path, poll_secs: int = 5) -> TritonServer:
    repo = tmp / "repo"
    build(SPECS / spec, repo, force=True)
    options = ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), ready_timeout_s=180, poll_secs=poll_secs,
                            log_file=tmp / "tritonserver.log")
    return TritonServer(options)


def start_server_roomy_decode(spec: Mapping[str, Any], tmp: Path,
                              decode_batch: int = 64) -> TritonServer:
    """A server for ``spec`` (a dict) whose decodes batch ``decode_batch`` while
    every other instance keeps the spec's ``max_batch_size``: the prefill is
    then the only bottleneck."""
    instances = [replace(i, max_batch_size=decode_batch) if i.role == "decode" else i
                 for i in instances_from_spec(dict(spec))]
    repo = write_repository(instances, tmp / "repo")
    options = ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), ready_timeout_s=180,
                            log_file=tmp / "tritonserver.log")
    return TritonServer(options)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_server("tiny_pd.yaml", tmp_path_factory.mktemp("tiny_pd"))
    with server:
        yield server
