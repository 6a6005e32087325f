"""A process that holds the passphrase or a key protects its own memory from the disk and from its neighbours.

Three settings, made once at start by every such process (the CLI, and so the console, the MCP server and the
training launcher; the job runner; anyone who unlocks a vault through the API):

- `RLIMIT_CORE` 0 (soft and hard): a crash leaves no core file, so the passphrase and the data key never
  reach the disk that way, whatever the box's `ulimit -c` or `kernel.core_pattern` say. A hard limit of 0
  cannot be raised again by this process or its children.
- `PR_SET_DUMPABLE` 0: the kernel makes `/proc/PID/environ`, `/proc/PID/mem` and ptrace of this process
  root's alone, so another process of the same user (a tool a model chose to call, a hostile task module)
  cannot read the passphrase from the environment or the keys from memory. A program this process
  executes starts dumpable again: children that hold nothing secret stay debuggable.
- `PYTHONSAFEPATH=1` in its environment, which the Python programs it starts inherit: `python -m ...` and
  `python -c ...` (the job runner, torchrun and its ranks, multiprocessing's scan workers, fork server and
  resource tracker) would otherwise import from the current directory first, so a folder named `appliance` or
  `multiprocessing` where the operator stands (a repository being ingested) would run in a process that gets
  the plaintext and the keys.

`doctor` still warns about the box's own settings; this is the process's guarantee, whatever they are.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_done = False


def protect_process() -> None:
    """No core dumps, not dumpable, children import nothing from the current directory. Idempotent and cheap;
    Linux only (elsewhere it sets what it can)."""
    global _done
    if _done:
        return
    os.environ["PYTHONSAFEPATH"] = "1"
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


def drop_secrets_from_env() -> None:
    """A child that needs no passphrase holds none: the APPLIANCE_*PASSPHRASE* variables leave its environment
    (its children's too), and on Linux the copy the kernel keeps of what it was started with, which
    /proc/self/environ shows, is overwritten with zeros (a process can always read its own)."""
    names = [n for n in os.environ if n.startswith("APPLIANCE_") and "PASSPHRASE" in n]
    for name in names:
        del os.environ[name]
    if names and sys.platform.startswith("linux"):
        _wipe_started_env(names)


def _wipe_started_env(names: list[str]) -> None:
    """Zero the entries `NAME=value` of `names` where the kernel put the environment at exec (fields 50 and 51
    of /proc/self/stat: its start and end). Nothing points at them once `unsetenv` has dropped them."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51; 3 is the first here)
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except (OSError, IndexError, ValueError):
        return
    if len(block) != end - start:
        return  # not the block the kernel described: leave it
    prefixes = tuple(n.encode() + b"=" for n in names)
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1
