"""A real tritonserver per test module, on a repository generated from a spec.

The fixture picks free ports, waits until every model is READY and ALWAYS
stops the server and its stubs (also when the test fails).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from pdserve.server.launcher import ServerOptions, TritonServer, describe_exit, free_port
from pdserve.server.repo import build, instances_from_spec, write_repository

SPECS = Path(__file__).parent / "specs"
FRAMES_SHOWN = 8  # innermost frames per thread in a failure's dump
LOG_LINES_SHOWN = 40


class DiagnosedServer(TritonServer):
    """A ``TritonServer`` that, when the test fails inside it, first writes to
    stderr (which pytest prints with the failure) whether tritonserver itself
    died, every stub's threads (their innermost frames) and the log's last lines:
    a hang in CI then says what each stub was waiting on."""

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is not None and issubclass(et, Exception):
            try:
                self._diagnose()
            except Exception as exc:  # the diagnosis must not hide the failure
                sys.stderr.write(f"(no diagnosis: {exc})\n")
        super().__exit__(et, e, tb)

    def _diagnose(self) -> None:
        assert self.process is not None
        if (code := self.process.poll()) is not None:
            sys.stderr.write(f"--- tritonserver itself {describe_exit(code)} ---\n")
        for model, dump in self.dump_stacks().items():
            sys.stderr.write(f"--- {model}: threads at the failure ---\n"
                             f"{condense_dump(dump)}\n")
        log = self.options.log_file
        if log is not None and log.exists():
            # Its own lines, not the tables it prints at start.
            lines = [line for line in log.read_text(errors="replace").splitlines()
                     if line.strip() and line[0] not in "|+" and "(most recent call" not in line
                     and not line.startswith("  File ")]
            sys.stderr.write("--- the server log's last lines ---\n"
                             + "\n".join(lines[-LOG_LINES_SHOWN:]) + "\n")


def condense_dump(dump: str) -> str:
    """faulthandler's dump with each thread cut to its ``FRAMES_SHOWN`` innermost
    frames and each path to its last two parts."""
    out: list[str] = []
    shown = 0
    for line in dump.splitlines():
        if "(most recent call first)" in line:
            out.append(line)
            shown = 0
        elif line.startswith("  File ") and shown < FRAMES_SHOWN:
            out.append(re.sub(r'"(?:[^"]*/)?([^"/]+/[^"/]+)"', r"\1", line))
            shown += 1
    return "\n".join(out)


def start_server(spec: str, tmp: Path, poll_secs: int = 5) -> TritonServer:
    repo = tmp / "repo"
    build(SPECS / spec, repo, force=True)
    options = ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), ready_timeout_s=180, poll_secs=poll_secs,
                            log_file=tmp / "tritonserver.log")
    return DiagnosedServer(options)


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
    return DiagnosedServer(options)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_server("tiny_pd.yaml", tmp_path_factory.mktemp("tiny_pd"))
    with server:
        yield server
