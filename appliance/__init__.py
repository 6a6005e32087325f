"""Offline appliance: train, evaluate and ship language models on private data."""

__version__ = "0.1.0"
