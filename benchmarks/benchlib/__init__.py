"""Building blocks of ``benchmarks/auth_bench.py``: the private site, wrk, the service's metrics, the report."""
