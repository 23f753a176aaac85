"""Benchmarks that measure upmoe against a reference side by side, in one process, and print ratios."""
