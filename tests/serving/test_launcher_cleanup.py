"""What a server takes from the machine goes with it: its process group, and the
stubs' IPC regions in /dev/shm, also those of a stub killed with SIGKILL (the
Python backend unlinks a region only when its stub shuts down cleanly)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.serving.conftest import start_server
from tests.serving.helpers import generate_many, kill_stub, stub_pid

pytestmark = pytest.mark.e2e


def test_stop_leaves_no_process_and_no_shm_region(tmp_path: Path) -> None:
    with start_server("tiny_pd.yaml", tmp_path) as server:
        assert server.process is not None
        group = server.process.pid
        live = server.shm_regions()
        # One region per stub (router, prefill, decode, aggregated), under this
        # server's own prefix: the sweep cannot touch another server's.
        assert len(live) >= 4 and all(p.name.startswith(server.shm_prefix) for p in live)
        doomed = stub_pid(server, "decode")
        assert list(Path("/dev/shm").glob(f"pdkv-{doomed}-*"))  # its KV arena
        kill_stub(doomed)
        # Triton restarts the killed stub on the next request: a new region.
        ok = generate_many(server.options.grpc_url, [{"text": "hi", "scenario": "agg",
                                                      "sampling": {"max_tokens": 2}}])
        assert ok[0].error is None
        assert len(server.shm_regions()) >= len(live)
    assert server.shm_regions() == []
    # The killed decode's arena: swept by a restarted stub, or at the latest by stop.
    assert not list(Path("/dev/shm").glob(f"pdkv-{doomed}-*"))
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
