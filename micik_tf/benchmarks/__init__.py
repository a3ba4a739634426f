"""Benchmark suites behind `tools/benchmark.py`: each is a function
`suite(options) -> results dict`, with a markdown renderer beside it."""
