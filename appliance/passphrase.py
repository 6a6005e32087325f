"""Getting a passphrase without putting it on a command line: a file, the environment, or a prompt."""

from __future__ import annotations

import getpass
import os
import sys

from appliance.errors import ApplianceError
from appliance.hardening import protect_process

MIN_LENGTH = 8


def from_env(prefix: str) -> str | None:
    if path := os.environ.get(f"{prefix}_FILE"):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ApplianceError(f"cannot read {prefix}_FILE {path}: {e.strerror}", "fix the path") from e
        return text.rstrip("\r\n")
    return os.environ.get(prefix)


def get_passphrase(confirm: bool = False, prefix: str = "APPLIANCE_PASSPHRASE", label: str = "passphrase") -> str:
    """Read the passphrase from `{prefix}_FILE`, `{prefix}`, or a terminal prompt, in that order."""
    protect_process()  # before the passphrase is in this process's memory
    value = from_env(prefix)
    if value is None:
        if not sys.stdin.isatty():
            raise ApplianceError(
                f"no {label} given", f"set {prefix}_FILE or {prefix}, or run on a terminal to be asked"
            )
        value = getpass.getpass(f"{label.capitalize()}: ")
        if confirm and getpass.getpass(f"Repeat {label}: ") != value:
            raise ApplianceError(f"the two {label}s differ", "type the same one twice")
    if not value:
        raise ApplianceError(f"empty {label}", f"give a {label} of at least {MIN_LENGTH} characters")
    return value


def check_new(value: str) -> str:
    if len(value) < MIN_LENGTH:
        raise ApplianceError(
            f"passphrase too short ({len(value)} characters)", f"use at least {MIN_LENGTH} characters"
        )
    return value
