"""Evaluate: operator-defined suites (suite.py), scoring (metrics.py), the same suite on transformers or
llama.cpp (backends.py), runs stored in the vault, comparison and release gates (run.py)."""
