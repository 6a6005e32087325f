"""A process that holds the passphrase or a key protects its own memory from the disk and from its neighbours.

Two settings, made once at start by every such process (the CLI, and so the console, the MCP server and the
training launcher; the job runner; anyone who unlocks a vault through the API):

- `RLIMIT_CORE` 0 (soft and hard): a crash leaves no core file, so the passphrase and the data key never
  reach the disk that way, whatever the box's `ulimit -c` or `kernel.core_pattern` say. A hard limit of 0
  cannot be raised again by this process or its children.
- `PR_SET_DUMPABLE` 0: the kernel makes `/proc/PID/environ`, `/proc/PID/mem` and ptrace of this process
  root's alone, so another process of the same user (a tool a model chose to call, a hostile task module)
  cannot read the passphrase from the environment or the keys from memory. A program this process
  executes starts dumpable again: children that hold nothing secret stay debuggable.

`doctor` still warns about the box's own settings; this is the process's guarantee, whatever they are.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_done = False


def protect_process() -> None:
    """No core dumps, not dumpable. Idempotent and cheap; Linux only (elsewhere it sets what it can)."""
    global _done
    if _done:
        return
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # pragma: no cover - lowering a limit is always allowed
        pass
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # pragma: no cover - cannot fail for this value
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    _done = True


def is_protected() -> bool:
    """What the kernel says about this process: core limit 0 and not dumpable (for doctor and tests)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if not sys.platform.startswith("linux"):
        return soft == 0 and hard == 0
    dumpable = ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    return soft == 0 and hard == 0 and dumpable == 0


_START = threading.Lock()


@contextmanager
def no_imports_from_cwd() -> Iterator[None]:
    """Python programs started inside the block (multiprocessing's spawn and fork-server children, which run
    `python -c ...`) import nothing from the current directory: `-c` puts it first on their path, so a folder
    named `multiprocessing` or `appliance` where the operator stands would run in the process that gets the
    plaintext and the keys. PYTHONSAFEPATH=1 in the environment for the block; one block at a time."""
    with _START:
        old = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = old


def drop_secrets_from_env() -> None:
    """A child that needs no passphrase holds none: the APPLIANCE_*PASSPHRASE* variables leave its environment
    (its children's too). With `protect_process`, what it was started with cannot be read either."""
    for name in [n for n in os.environ if n.startswith("APPLIANCE_") and "PASSPHRASE" in n]:
        del os.environ[name]
