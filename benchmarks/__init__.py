"""Benchmarks, run as scripts from a source checkout (`python benchmarks/NAME.py`)."""
