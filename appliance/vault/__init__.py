"""The encrypted vault: keys, the DuckDB connection, ingest, PII, versions, lineage and audit."""

from appliance.vault.vault import CheckReport, Vault

__all__ = ["Vault", "CheckReport"]
