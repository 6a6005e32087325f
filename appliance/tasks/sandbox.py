"""The tool sandbox: one call of a task's tool, in a separate, limited, secret-free process.

A call is checked against the tool's declared arguments, then run by `python -I` in a session of its own,
with no secrets in its environment, a private working directory, limits on address space (1 GiB), CPU
seconds and core dumps, and a wall-clock timeout after which its whole process group is killed; what the
tool prints is kept apart from its result. The process that calls tools makes itself non-dumpable, so a
tool cannot read the passphrase or keys from its /proc files. When the appliance runs as root (as CI does),
root may read any process's memory whatever its dumpable flag, so the sandbox drops to the unprivileged
`nobody` (no supplementary groups, PR_SET_NO_NEW_PRIVS) before the tool's code runs, in a working directory
of its own. The tool's module source is read by the appliance and handed over on stdin, so the code hashed
into the task's sha256 is the code that runs, and a checkout or task folder under a 0700 directory still
works; the sandbox runs the first Python that user can execute (ours, the one it was made from, the
system's python3: with the last two a tool has the standard library only). Otherwise a tool runs as the
appliance's user: what it can reach on disk is what that user can; tools are the site's own code, to be
reviewed like it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from appliance.hardening import protect_process
from appliance.tasks.taskfile import TYPES, Task

SANDBOX_MEMORY = 1 << 30  # bytes of address space a tool may use
_RUNNER = r"""
import ctypes, importlib, json, os, resource, sys, types
try:  # PR_SET_NO_NEW_PRIVS: no setuid program hands privileges back to the tool
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
except (OSError, AttributeError):
    pass
limit, cpu = int(sys.argv[2]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
sys.path[:0] = json.loads(sys.argv[3])
out_fd = os.dup(1)
os.dup2(2, 1)  # what the tool prints goes to stderr; stdout carries only the result
mod, fn = sys.argv[1].split(":")
payload = json.loads(sys.stdin.read())
args, source = payload["args"], payload.get("source")
try:
    if source:  # the module's code as the appliance read (and hashed) it
        m = types.ModuleType(mod)
        m.__file__ = source[0]
        sys.modules[mod] = m
        exec(compile(source[1], source[0], "exec"), m.__dict__)
    else:
        m = importlib.import_module(mod)
    out = getattr(m, fn)(**args)
    text = json.dumps({"ok": True, "result": out})
except Exception as e:
    text = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
os.write(out_fd, text.encode())
"""


SANDBOX_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_pythons: dict[tuple[int, int] | None, str | None] = {}


def sandbox_ids() -> tuple[int, int] | None:
    """(uid, gid) the sandbox drops to: `nobody`'s when this process is root (root may read any process's
    memory, dumpable or not), else None (the tool runs as this user; key holders are non-dumpable)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _drop(ids: tuple[int, int] | None) -> dict:
    return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}


def sandbox_python(ids: tuple[int, int] | None) -> str | None:
    """The interpreter the sandbox runs: ours, or (when `ids` cannot run it, e.g. it lives under a 0700
    folder) the one it was made from or the system's python3; None when that user can run none."""
    if ids is None:
        return sys.executable
    if ids not in _pythons:
        import shutil

        found = None
        for cand in dict.fromkeys(c for c in (sys.executable, os.path.realpath(sys.executable),
                                             getattr(sys, "_base_executable", ""),
                                             shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")) if c):
            try:
                r = subprocess.run([cand, "-I", "-c", "import ctypes, json, resource, types"], env=SANDBOX_ENV,
                                   cwd="/", capture_output=True, timeout=30, **_drop(ids))
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                found = cand
                break
        _pythons[ids] = found
    return _pythons[ids]


def call_tool(task: Task, name: str, arguments) -> dict:
    """Run one call in the sandbox; {"ok", "result" | "error", "seconds"}. Never raises for the tool's sake."""
    t0 = time.perf_counter()

    def done(**kw) -> dict:
        return {**kw, "seconds": round(time.perf_counter() - t0, 3)}

    tool = task.tools.get(name)
    if tool is None:
        return done(ok=False, error=f"no tool {name!r}; the tools are {', '.join(task.tools)}")
    if not isinstance(arguments, dict):
        return done(ok=False, error="arguments must be a JSON object")
    if missing := sorted(set(tool.args) - set(arguments)):
        return done(ok=False, error=f"missing argument(s) {', '.join(missing)}")
    if extra := sorted(set(arguments) - set(tool.args)):
        return done(ok=False, error=f"unknown argument(s) {', '.join(extra)}")
    for k, typ in tool.args.items():
        v = arguments[k]
        if isinstance(v, bool) and typ != "bool" or not isinstance(v, TYPES[typ]):
            return done(ok=False, error=f"argument {k} must be {typ}")
    # -I: no PYTHONPATH, no user site; the environment carries no passphrase, key or home
    protect_process()  # the tool may not read this process's /proc files (it may hold the keys)
    ids = sandbox_ids()  # as root: the tool runs as nobody, so root's reach is not the tool's
    python = sandbox_python(ids)
    if python is None:
        return done(ok=False, fatal=True, error=f"{name}'s sandbox did not start: no Python that the unprivileged "
                                                f"user {ids[0]} can run (install a system python3)")
    source = task.sources.get(tool.function.split(":")[0])
    with tempfile.TemporaryDirectory(prefix="appliance-tool-") as cwd:
        if ids:
            os.chown(cwd, *ids)  # the tool's private working directory is its own
        try:
            proc = subprocess.Popen([python, "-I", "-c", _RUNNER, tool.function, str(SANDBOX_MEMORY),
                                     json.dumps(task.paths), str(int(task.tool_timeout) + 1)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=dict(SANDBOX_ENV), start_new_session=True, **_drop(ids))
        except OSError as e:
            return done(ok=False, fatal=True, error=f"{name}'s sandbox did not start: {e.strerror or e}")
        try:
            raw_out, raw_err = proc.communicate(json.dumps({"args": arguments, "source": source}).encode(),
                                                timeout=task.tool_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return done(ok=False, fatal=True, error=f"{name} did not answer within {task.tool_timeout:g} s")
        _kill_group(proc)  # anything the tool left running
    stdout, stderr = raw_out.decode("utf-8", "replace"), raw_err.decode("utf-8", "replace")
    try:
        out = json.loads(stdout)
    except ValueError:
        last = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return done(ok=False, fatal=True, error=f"{name}'s sandbox failed: {last[:300]}")
    if not isinstance(out, dict) or "ok" not in out:
        return done(ok=False, fatal=True, error=f"{name}'s sandbox answered nonsense")
    return done(**out)


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
