"""pdserve.scheduler.sim: a discrete-event simulator of a pdserve cluster.

It lives under ``scheduler/`` (not ``perf/``) because it is a consumer of the
routing and ratio policies, like the router and the controller are: it imports
``pdserve.scheduler`` (forwarding, decode choice, ratio, the controller's
health state machine, ratio loop and signal code) and drives them in virtual
time, so a policy change is simulated by the code that ships. ``perf/sim_*.py``
holds only the experiment scripts that run it.

Modules, one idea each:

- ``profile``: latency models of an instance (prefill, decode step, KV
  transfer per mode, failure/reload times), loaded from JSON/YAML;
- ``fit``: fits a profile from ``perf/engine.py`` and ``perf/kv_transfer.py``;
- ``events``: the event heap (deterministic for a seed);
- ``index``: per-scenario instance order kept under updates (no O(N) scans);
- ``instance``: one simulated instance (prefill batches, fluid decode batch);
- ``workload``: Poisson/bursty/day-night/trace arrivals, failure injection;
- ``arrivals``: a scenario's arrivals as ``workload`` draws them, compiled natively;
- ``config`` / ``spec``: what to simulate, as dataclasses / from YAML;
- ``cluster``: a request's path (routing, admission, decode choice);
- ``control``: failures and recovery, the P/D ratio loop;
- ``results`` / ``runner``: per-request outcomes -> the ``pdserve bench`` JSON shape;
- ``compare``: simulated vs measured, relative error per field;
- ``cli``: ``pdserve sim run | profile | compare``;
- ``native``: an optional mypyc build of events, index, instance, arrivals,
  cluster and results (the policies stay interpreted), for the scale run.
"""

import os as _os

if _os.environ.get("PDSERVE_SIM_NATIVE"):  # run the native build of the event machinery
    from pdserve.scheduler.sim.native import activate as _activate

    _activate(_os.environ["PDSERVE_SIM_NATIVE"], __path__)
