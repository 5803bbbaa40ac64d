"""Speed and memory benchmarks against references: ``python -m benchmarks.<name>``."""
