"""Imported once by the fork server that scan workers are forked from (`scan.pool`), before it forks any:
the scanner's modules and its name lists, loaded there once and shared by every worker instead of loaded again
in each. Nothing here starts a thread or opens a file besides the name lists: the server must stay safe to fork."""

from appliance.vault import pii_names, scan  # noqa: F401  (scan: the readers and the scrubber, as workers use them)

pii_names.scorer()
