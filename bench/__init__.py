"""Benchmarks (`make bench`), apart from the tests: each compares against a baseline taken in the
same run on the same machine, prints a table and writes ``bench/out/summary.json``."""
