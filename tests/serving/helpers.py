"""Client helpers for the e2e tests: gRPC streaming, HTTP generate, metrics."""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from pdserve.server.launcher import TritonServer


@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    error: str | None = None
    responses: int = 0
    token_times: list[float] = field(default_factory=list)  # monotonic, one per token
    ended_at: float = 0.0  # monotonic time of the final response or the error
    error_at: float = 0.0  # monotonic time of the error (see generate_many on matching)

    @property
    def max_gap_s(self) -> float:
        """Longest wait between two consecutive tokens the client saw."""
        t = self.token_times
        return max((b - a for a, b in itertools.pairwise(t)), default=0.0)


def _inputs(text: str | None, ids: list[int] | None, stream: bool,
            sampling: dict[str, Any] | None, scenario: str | None) -> list[Any]:
    inputs = []
    if text is not None:
        t = grpcclient.InferInput("text_input", [1], "BYTES")
        t.set_data_from_numpy(np.array([text.encode()], dtype=object))
        inputs.append(t)
    if ids is not None:
        t = grpcclient.InferInput("input_ids", [len(ids)], "INT32")
        t.set_data_from_numpy(np.array(ids, dtype=np.int32))
        inputs.append(t)
    s = grpcclient.InferInput("stream", [1], "BOOL")
    s.set_data_from_numpy(np.array([stream]))
    inputs.append(s)
    e = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
    e.set_data_from_numpy(np.array([True]))
    inputs.append(e)
    if sampling is not None:
        p = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        p.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=object))
        inputs.append(p)
    if scenario is not None:
        c = grpcclient.InferInput("scenario", [1], "BYTES")
        c.set_data_from_numpy(np.array([scenario.encode()], dtype=object))
        inputs.append(c)
    return inputs


def generate_many(url: str, requests: list[dict[str, Any]], *, stream: bool = True,
                  timeout_s: float = 120.0, stop: threading.Event | None = None) -> list[Result]:
    """Send every request on one gRPC stream at once; collect each until FINAL.
    ``timeout_s`` bounds the wait for each next response. Once ``stop`` is set the
    stream is closed with its requests cancelled, and what has come back is returned
    (unfinished requests have no finish_reason)."""
    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    results = [Result() for _ in requests]
    try:
        for i, r in enumerate(requests):
            client.async_stream_infer(
                "pdserve",
                _inputs(r.get("text"), r.get("ids"), stream, r.get("sampling"), r.get("scenario")),
                request_id=str(i), enable_empty_final_response=True,
            )
        pending = len(requests)
        last = time.monotonic()
        while pending and not (stop is not None and stop.is_set()):
            try:
                result, error = events.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() - last > timeout_s:
                    raise TimeoutError(f"no response for {timeout_s:.0f} s with {pending} of "
                                       f"{len(requests)} requests unfinished") from None
                continue
            last = time.monotonic()
            if error is not None:
                # Errors carry no request id in the callback: give it to a request
                # that has had no response yet (requests fail before their first
                # token here, or on instance loss), else to the first unfinished one.
                open_ = [i for i, r in enumerate(results) if r.error is None and
                         not r.finish_reason]
                idx = next((i for i in open_ if results[i].responses == 0), open_[0])
                results[idx].ended_at = results[idx].error_at = time.monotonic()
                results[idx].error = str(error)
                pending -= 1
                continue
            resp = result.get_response()
            res = results[int(resp.id)]
            res.responses += 1
            out = result.as_numpy("text_output")
            if out is not None and out.size:
                res.text += out.reshape(-1)[0].decode("utf-8", errors="replace")
                new_ids = result.as_numpy("output_ids").tolist()
                res.ids.extend(new_ids)
                res.token_times.extend([time.monotonic()] * len(new_ids))
                reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
                res.finish_reason = reason or res.finish_reason
            if resp.parameters["triton_final_response"].bool_param:
                res.ended_at = time.monotonic()
                pending -= 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return results


def http_generate(http_url: str, body: dict[str, Any], timeout_s: float = 60.0,
                  endpoint: str = "generate") -> tuple[int, dict[str, Any] | str]:
    req = urllib.request.Request(f"http://{http_url}/v2/models/pdserve/{endpoint}",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read().decode()
            return resp.status, raw if endpoint == "generate_stream" else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


_METRIC = re.compile(r'^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """{(metric name, instance): value} for the pdserve_* metrics (scenarios summed)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m.group(1).startswith("pdserve_"):
            inst = re.search(r'instance="([^"]+)"', m.group(2))
            if inst and "le=" not in m.group(2):  # summed over scenario labels
                key = (m.group(1), inst.group(1))
                out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def scrape_until(metrics_url: str, ok: Callable[[dict[tuple[str, str], float]], bool],
                 timeout_s: float = 5.0) -> dict[tuple[str, str], float]:
    """``scrape`` until ``ok`` holds (stubs send metric updates every 0.25 s,
    roles.metric_buffer), or the timeout; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(metrics_url)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def scrape_settled(metrics_url: str, keys: Sequence[tuple[str, str]],
                   timeout_s: float = 15.0) -> dict[tuple[str, str], float]:
    """A scrape in which ``keys`` held still for a second: earlier requests' updates
    still in a stub's metric buffer (sent every 0.25 s; later on a loaded CI machine)
    have landed."""
    before = scrape(metrics_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = scrape(metrics_url)
        if all(now.get(k, 0.0) == before.get(k, 0.0) for k in keys):
            return now
        before = now
    return before


def drive_until(url: str, prompt_len: int, out_len: int, until: Callable[[], bool],
           timeout_s: float, results: list[Result]) -> float:
    """Closed loop, 8 concurrent, until ``until()``; the seconds it took."""
    t0 = time.monotonic()
    i = 0
    while not until():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"the ratio did not move within {timeout_s}s")
        reqs = [{"ids": [3 + (i + k + j) % 250 for j in range(prompt_len)],
                 "sampling": {"max_tokens": out_len, "ignore_eos": True}} for k in range(8)]
        i += 8
        results.extend(generate_many(url, reqs, timeout_s=120))
    return time.monotonic() - t0


def stub_pid(server: TritonServer, model: str) -> int:
    """The pid of ``model``'s stub process in ``server``'s process group."""
    pid = server.stubs().get(model)
    if pid is None:
        raise AssertionError(f"no stub process for {model}")
    return pid


def kill_stub(pid: int) -> None:
    """SIGKILL a stub and wait until it is dead (or a zombie Triton has not reaped)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text().split()
        if stat[2] == "Z":  # zombie until Triton reaps it: dead for our purpose
            break
        time.sleep(0.02)
