"""Benchmark and experiment drivers (not tests): throughput rows, the reference quality run, the real-data run.

Run them as scripts from the repository root, e.g. `python benchmarks/run_all.py`; their pure logic is tested
in tests/test_bench.py.
"""
