"""Structured logs: one JSON object per line in HOME/logs/appliance.log, rotated; `--verbose` shows them too.

What is logged is what the appliance did, never what the vault holds: command names and the names of the
options given (never their values: a value can be a query, a path or a passphrase), outcomes, exit codes,
durations, ids the appliance made (job ids), and the kind of an error (not its message: a database error
can quote a value; the message goes to the operator's terminal only). Only the "appliance"
logger writes here; libraries' loggers do not (their messages can quote data). Files are 0600 in the
home's 0700 logs directory; `APPLIANCE_LOG_MAX_BYTES` (default 5 MiB) and 5 rotated files bound them.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

LOGGER = logging.getLogger("appliance")
LOGGER.addHandler(logging.NullHandler())  # a library user who set nothing up gets nothing, not stderr
FILE = "appliance.log"
KEEP = 5


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                           f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "pid": record.process,
                           "event": record.getMessage(), **getattr(record, "fields", {})}, default=str)


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return f"{record.levelname.lower()}: {record.getMessage()}" + (f" {fields}" if fields else "")


class _Private(logging.handlers.RotatingFileHandler):
    def _open(self):
        # never through a link planted at the log's name
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def handleError(self, record: logging.LogRecord) -> None:
        """A log that cannot be written (full disk, a file of another user) must not break the command or
        print a traceback: say so once per process on stderr, and go on without it."""
        global _WARNED
        if not _WARNED:
            _WARNED = True
            sys.stderr.write(f"warning: cannot write the log {self.baseFilename}; the command goes on without it\n")


_WARNED = False


def setup(logs_dir, verbose: bool = False) -> None:
    """(Re)configure for one command: the file when the home has a logs directory, stderr when verbose."""
    for h in list(LOGGER.handlers):
        if not isinstance(h, logging.NullHandler):
            LOGGER.removeHandler(h)
            h.close()
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOGGER.propagate = False
    if logs_dir is not None and os.path.isdir(logs_dir):
        fh = _Private(os.path.join(logs_dir, FILE), maxBytes=int(os.environ.get("APPLIANCE_LOG_MAX_BYTES") or 5 << 20),
                      backupCount=KEEP, delay=True)
        fh.setFormatter(_Json())
        LOGGER.addHandler(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(_Plain())
        LOGGER.addHandler(sh)


def event(name: str, level: int = logging.INFO, **fields) -> None:
    """One event with its fields (ids, counts, seconds: never vault content or secrets)."""
    LOGGER.log(level, name, extra={"fields": fields})


def debug(name: str, **fields) -> None:
    event(name, logging.DEBUG, **fields)
