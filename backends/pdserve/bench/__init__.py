"""``pdserve bench``: a load generator for Triton LLM endpoints.

It reports the metrics genai-perf reports (TTFT, inter-token latency, request
latency, request and output-token throughput, goodput under SLOs) for
closed-loop concurrency, Poisson/gamma request rates and trace replay.

Modules, one concept each:
  records   what one request asked for (RequestSpec) and what happened (RequestRecord)
  workload  arrival times and synthetic lengths
  traces    Azure CSV / JSONL trace readers with time and length scaling
  client    asyncio gRPC streaming client: RequestSpec -> RequestRecord
  runner    load modes, warmup, deadline, progress: many RequestRecords
  metrics   pure functions: records -> summary
  report    console table, JSON, CSV
  plots     latency CDFs and per-second throughput PNGs
  cli       the ``pdserve bench`` subcommand
"""
