"""pdserve.scheduler.controller: the ``pdserve controller`` process and ``pdserve upgrade``.

Modules, one idea each:
  protocol    the heartbeat contract an instance answers (``control`` -> ``load``)
  repository  reading the deployment from the model repository; atomic edits
  state       the state file several routers read (JSON, written atomically)
  health      per-instance health state machine and the monitor that drives it
  probe       the real Triton probe client (readiness, loaded config, heartbeat)
  signals     capacity signals per scenario from Triton's /metrics text
  ratio_loop  P/D ratio per scenario: decide, drain first, then switch a role
  upgrade     rolling upgrade, one instance at a time
  metrics     the controller's own prometheus-client registry
  controller  the long-running loop tying them together, and its CLI
"""
