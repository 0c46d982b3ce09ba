"""PNG plots of a run: latency CDFs and per-second throughput.

matplotlib is imported only when plotting (it is an optional extra and slow
to import), with the Agg backend so no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.metrics import inter_token_latency_s, request_latency_s, ttft_s
from pdserve.bench.records import RequestRecord
from pdserve.errors import InvalidArgument


def per_second_throughput(
    records: Sequence[RequestRecord],
) -> tuple[list[int], list[int], list[int]]:
    """(second, output tokens delivered in it, successful requests ending in it).

    Tokens count every response, including those of requests that later
    failed: they are what the server delivered in that second.
    """
    if not records:
        return [], [], []
    last = max(r.end_s for r in records)
    seconds = list(range(math.floor(last) + 1))
    tokens = [0] * len(seconds)
    done = [0] * len(seconds)
    for r in records:
        for t, n in zip(r.response_s, r.response_tokens, strict=True):
            tokens[math.floor(t)] += n
        if r.is_ok:
            done[math.floor(r.end_s)] += 1
    return seconds, tokens, done


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and the fraction of values <= each."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def write_plots(records: Sequence[RequestRecord], out_dir: str | Path, title: str) -> list[Path]:
    """Write latency_cdf.png and throughput.png into ``out_dir``; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InvalidArgument(
            f"--plot needs matplotlib (pip install 'pdserve[plot]'): {e}"
        ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.is_ok]
    series = {
        "TTFT (ms)": [v * 1000 for r in ok if (v := ttft_s(r)) is not None],
        "Inter-token latency (ms)": [
            v * 1000 for r in ok if (v := inter_token_latency_s(r)) is not None
        ],
        "Request latency (ms)": [v * 1000 for r in ok if (v := request_latency_s(r)) is not None],
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (label, values) in zip(axes, series.items(), strict=True):
        if values:
            xs, ys = cdf(values)
            ax.step(xs, ys, where="post")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: latency CDFs ({len(ok)} successful requests)")
    fig.tight_layout()
    cdf_path = out / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    seconds, tokens, done = per_second_throughput(records)
    fig, ax1 = plt.subplots(figsize=(10, 4))
    ax1.plot(seconds, tokens, color="tab:blue", label="output tokens/s")
    ax1.set_xlabel("time since start (s)")
    ax1.set_ylabel("output tokens/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(seconds, done, color="tab:orange", label="completed requests/s")
    ax2.set_ylabel("completed requests/s", color="tab:orange")
    ax1.grid(alpha=0.3)
    fig.suptitle(f"{title}: throughput per second")
    fig.tight_layout()
    tput_path = out / "throughput.png"
    fig.savefig(tput_path, dpi=100)
    plt.close(fig)
    return [cdf_path, tput_path]
