"""Signed offline bundles of models, datasets and their lineage.

This package stays light: it depends on `cryptography` alone so an edge device can verify and unpack a
bundle with nothing else installed.
"""

__version__ = "0.1.0"
