"""The project's benchmarks, run as modules from the repository root:
`python -m bench.bench_lora --quick` (bench/README.md lists them). bench.common holds what
they share: hardware, timing and charts."""
