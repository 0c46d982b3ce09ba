"""pdserve benchmarks: `python -m perf.<name>` from the repository root."""
