"""Disaggregation experiments E1-E3: each module is one command.

    python -m perf.experiments.e1_disagg_vs_agg [--quick]
    python -m perf.experiments.e2_forwarding_vs_queue [--quick]
    python -m perf.experiments.e3_dynamic_ratio [--quick]

Each builds its deployment spec(s), starts its own tritonserver (free loopback
ports, always stopped), drives it with the ``pdserve.bench`` library, writes
JSON and PNG into ``perf/out/<exp>/`` and its section of perf/RESULTS.md.
Shared plumbing lives in ``common``.
"""
