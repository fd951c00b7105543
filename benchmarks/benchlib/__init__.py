"""Building blocks of the benchmarks: the private site, wrk, the service's metrics, memory, the report."""
