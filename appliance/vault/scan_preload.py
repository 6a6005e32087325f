"""Imported once by the fork server that scan workers are forked from (`scan.pool`), before it forks any:
the scanner's modules and its name lists, loaded there once and shared by every worker instead of loaded again
in each. Nothing here starts a thread or opens a file besides the name lists: the server must stay safe to fork.

The server and its workers hold plaintext and the pseudonym key but no passphrase: it leaves their environment,
and they are protected as the ingest process is (no core dumps, not dumpable; forked workers inherit both)."""

from appliance.hardening import drop_secrets_from_env, protect_process

protect_process()
drop_secrets_from_env()

from appliance.vault import pii_names, scan  # noqa: E402, F401  (scan: the readers and the scrubber, as workers use them)

pii_names.scorer()
