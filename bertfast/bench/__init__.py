"""`bertfast bench`: the benchmark files (benchmarks/test_<op>.py, pytest-benchmark) run on whatever
device is here, as one table of median ms, TFLOP/s or GB/s, peak memory and speedups over the
baselines, saved as JSON, CSV, Markdown and a PNG; and `bertfast bench --static`, the kernels'
register/spill/shared-memory report compiled ahead of time without a GPU.

    from bertfast.bench import bench
    bench(ops="layer_norm,attention", preset="small", out="bench-results/now")  # -> exit status

``runner``: finds the benchmarks folder, runs pytest in a subprocess; ``results``: parses its JSON
and junit XML into rows, what was not measured and why, and writes the report.
"""

from bertfast.bench.runner import KNOWN_OPS, PRESETS, BenchError, bench, find_benchmarks_dir, parse_ops, static_report

__all__ = ["KNOWN_OPS", "PRESETS", "BenchError", "bench", "find_benchmarks_dir", "parse_ops", "static_report"]
