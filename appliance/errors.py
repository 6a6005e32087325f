"""One exception root; each area has a subclass. Every message is one line a user can act on.

The light `bundles` package (cryptography only, for edge devices) has its own root, `BundleError`. Its errors
are translated here, at the boundary: appliance code calls into `bundles` inside `bundle_errors()` (a context
manager and a decorator), so what reaches a skin is a `BundleRefused`, with the same message, hint and exit
code. No other appliance module imports `bundles.errors` (tests/test_errors.py walks the tree).
"""

from __future__ import annotations

from contextlib import contextmanager

from bundles.errors import BundleError


class ApplianceError(Exception):
    """Base of every error shown to a user: `str(err)` is the whole message, hint included."""

    exit_code = 1
    json_emitted = False  # the command already printed its JSON object (with "ok": false)

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)


def one_line(message: str, hint: str | None, code: int = 1) -> str:
    """The line a user sees for an error, the same in the CLI and the console."""
    line = message + (f"; {hint}" if hint else "")
    return line if code == 3 else f"error: {line}"


class UsageError(ApplianceError):
    """The command line itself is wrong (exit 2)."""

    exit_code = 2


class NotFound(UsageError):
    """A reference that names nothing here; its hint lists what does exist (ids of models, datasets, ...),
    which is the operator's help and not for an agent that may not read the vault."""


class VaultError(ApplianceError):
    """The vault cannot be opened, read or written as asked."""


class VaultBusy(VaultError):
    """Another process has the vault open; it is free again when that process finishes or lets go."""


class WrongPassphrase(VaultError):
    def __init__(self) -> None:
        super().__init__("wrong passphrase", "check APPLIANCE_PASSPHRASE[_FILE] or type it again")


class CheckFailed(VaultError):
    """A check ran and found problems; its report was already printed."""

    json_emitted = True


class EvalError(ApplianceError):
    """An evaluation could not run as asked."""


class IngestError(ApplianceError):
    """Input that cannot be ingested at all."""


class PartialIngest(ApplianceError):
    """Some inputs were skipped; the version still landed. Exit code 3 means 'partial'."""

    exit_code = 3


class BundleRefused(ApplianceError):
    """A bundle, key, trust entry or file that the `bundles` package refused, as it said it."""


@contextmanager
def bundle_errors():
    """Calls into `bundles` inside this block (or a function decorated with `@bundle_errors()`) raise
    `BundleRefused` instead of `BundleError`: the one place the two roots meet."""
    try:
        yield
    except BundleError as e:
        refused = BundleRefused(e.message, e.hint)
        refused.exit_code = e.exit_code
        raise refused from e
