"""The encrypted vault: keys, the DuckDB connection, ingest, PII, versions, lineage and audit.

`Vault` and `CheckReport` are imported on first use, not with the package: ingest's worker processes import
the scanner (`vault.scan`, `vault.fields`, the PII detectors) through this package, and each would otherwise
pay for DuckDB, pyarrow and the key handling it never touches before its first file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.vault.vault import CheckReport, Vault

__all__ = ["Vault", "CheckReport"]


def __getattr__(name: str):
    if name in __all__:
        from appliance.vault import vault

        return getattr(vault, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
