"""The controller against the REAL tritonserver (poll mode) with a trivial test model.

Proves: SIGKILL of a model's stub is detected by the heartbeat (the model
stays READY), the controller's reload edit makes Triton load it again with a
fresh stub, and the heartbeat is healthy again, within a bounded time. Then
``pdserve controller`` runs as its own process and stops cleanly on SIGTERM.

Measured with Triton 2.51: after a stub dies, the Python backend fails the
next request ("Stub process '<m>_0_0' is not healthy") and starts a new stub
by running ``initialize`` again in the SAME model load. An instance that
cannot re-initialise in place (pdserve's decode owns a named shared-memory
arena) then stays broken until the model is reloaded. The test model imitates
that: its ``initialize`` refuses a second run for the same ``generation``, so
only the controller's reload brings it back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pdserve.scheduler.controller.controller import Controller, ControllerOptions
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.controller.protocol import CONTROL_IO_PBTXT
from pdserve.scheduler.controller.repository import Repository
from pdserve.server.launcher import ServerOptions, TritonServer, free_port

pytestmark = pytest.mark.e2e

MODEL_PY = '''
import json, os, site
MARKERS = {markers!r}
for d in os.environ.get("PDSERVE_SITE_PACKAGES", "").split(os.pathsep):
    if d:
        site.addsitedir(d)
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {{k: v["string_value"] for k, v in cfg.get("parameters", {{}}).items()}}
        marker = os.path.join(MARKERS, args["model_name"] + "." + p.get("generation", "0"))
        if os.path.exists(marker):  # a restart inside the same load: state is gone
            raise RuntimeError("cannot re-initialise in place; reload the model")
        open(marker, "w").close()
        self.load = {{"name": args["model_name"], "role": p["role"],
                      "scenario": p["scenario"], "max_batch_size": 4}}

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            raw = pb_utils.get_input_tensor_by_name(request, "control").as_numpy().reshape(-1)[0]
            if json.loads(bytes(raw)) != {{"op": "health"}}:
                err = pb_utils.TritonError("unknown control op")
                sender.send(pb_utils.InferenceResponse(error=err),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            out = pb_utils.Tensor("load", np.array([json.dumps(self.load).encode()],
                                                   dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def write_model(repo: Path, name: str, role: str, markers: Path) -> None:
    (repo / name / "1").mkdir(parents=True)
    markers.mkdir(exist_ok=True)
    (repo / name / "1" / "model.py").write_text(MODEL_PY.format(markers=str(markers)))
    params = "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
                     for k, v in (("role", role), ("scenario", "default")))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n" + CONTROL_IO_PBTXT
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + params)


def stub_pids(server: TritonServer, model: str) -> list[int]:
    """Stubs of ``model`` in OUR server's process group (args name instance ``<model>_0_0``)."""
    assert server.process is not None
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,pgid=,args="], capture_output=True,
                         text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [int(pid) for pid, pgid, args in (r for r in rows if len(r) == 3)
            if int(pgid) == server.process.pid and "triton_python_backend_stub" in args
            and f"{model}_0_0" in args]


def wait_for(what: str, predicate, timeout_s: float, step) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        step()
        if predicate():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def test_killed_stub_is_detected_replaced_and_healthy_again(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    write_model(repo_dir, "prefill_0", "prefill", tmp_path / "markers")
    write_model(repo_dir, "decode_0", "decode", tmp_path / "markers")
    options = ServerOptions(repository=repo_dir, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), poll_secs=1, ready_timeout_s=60,
                            log_file=tmp_path / "triton.log")
    server = options.http_url
    with TritonServer(options) as triton:
        ctl = Controller(
            Repository(repo_dir), TritonProbeClient(timeout_s=2.0),
            ControllerOptions(servers=(server,), state_path=tmp_path / "state.json",
                              health=HealthPolicy(probe_interval_s=1.0, load_timeout_s=30)),
        )
        try:
            def tick() -> None:
                ctl.tick(time.time())

            def state(name: str) -> str:
                return ctl.state.instances[name].state

            wait_for("both healthy", lambda: {state("prefill_0"), state("decode_0")}
                     == {"healthy"}, 20, tick)
            (old_pid,) = stub_pids(triton, "prefill_0")
            os.kill(old_pid, signal.SIGKILL)
            # Detection: out of routing at the first failed heartbeat; Triton still says READY.
            detect_s = wait_for("prefill_0 out of routing",
                                lambda: not ctl.state.instances["prefill_0"].routable, 10, tick)
            wait_for("reload edit", lambda: ctl.repo.entry("prefill_0").generation == 1, 10, tick)
            recover_s = wait_for("prefill_0 healthy again",
                                 lambda: state("prefill_0") == "healthy", 40, tick)
            new_pids = stub_pids(triton, "prefill_0")
            assert new_pids and old_pid not in new_pids  # a fresh stub serves it
            assert state("decode_0") == "healthy"
            assert ctl.repo.entry("decode_0").generation == 0  # untouched
            reg = ctl.metrics.registry
            assert reg.get_sample_value("pdserve_controller_instance_recoveries_total",
                                        {"role": "prefill"}) == 1
            print(f"detected in {detect_s:.1f}s, healthy again {recover_s:.1f}s later")
        finally:
            ctl.close()
        check_cli_process(repo_dir, server, tmp_path)


def check_cli_process(repo_dir: Path, server: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "controller", "--repository", str(repo_dir),
         "--server", server, "--probe-interval-s", "1", "--metrics-port", "0", "--no-ratio",
         "--state-file", str(tmp_path / "cli-state.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "metrics http://" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            path = tmp_path / "cli-state.json"
            if path.exists() and json.loads(path.read_text())["instances"].get(
                    "prefill_0", {}).get("state") == "healthy":
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the controller process never reported prefill_0 healthy")
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert b'pdserve_controller_instances{role="prefill",state="healthy"} 1.0' in \
                resp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
