"""``python -m benchmarks``: list the benchmarks and how to run one."""

from .harness import benchmark_names

print("Benchmarks (run one with `python -m benchmarks.NAME [--quick] [--set KEY=VALUE]`):")
for name in benchmark_names():
    print(f"  {name}")
