"""Processes that hold the passphrase or keys leave no core dump and cannot be read by a neighbour.

The attack: a process of the same user (a tool a model chose to call, a hostile task module) reads
/proc/PID/environ of an appliance process and finds APPLIANCE_PASSPHRASE, or a crash writes the keys to a
core file. Each key holder is started for real and caught while it waits for its secret (the passphrase
from a FIFO, the job key on stdin); a second process with the same uid then tries to read it. Under root
both sides first drop to an unprivileged uid, since root reads any process (the kernel's owner of a
non-dumpable process's /proc files is root, which is the fact checked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import python_env

NOBODY = 65534
MARKER = "passphrase-marker-7f3a9c"

# Imports happen before the uid changes: the interpreter may live under a directory only root can enter.
TARGET = """
import os, sys
import appliance.cli, appliance.logs, appliance.passphrase, appliance.jobs.runner, appliance.vault.keys, getpass
import resource
# Start with core dumps allowed, as a box's default may (a test process that ran the CLI in-process has a
# hard limit of 0, which only root can raise again).
_, hard = resource.getrlimit(resource.RLIMIT_CORE)
try:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
except (ValueError, OSError):  # not root, or no CAP_SYS_RESOURCE: as high as allowed
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
if os.geteuid() == 0:
    os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})
    # A uid change leaves a process non-dumpable; one started by that user is dumpable: be that one.
    import ctypes; ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)
if sys.argv[1] == "cli":
    appliance.cli.main(sys.argv[2:])
else:
    sys.exit(appliance.jobs.runner.main(sys.argv[2:]))
"""


def _start(kind: str, args: list[str], shared: Path, stdin=None) -> subprocess.Popen:
    env = python_env()
    env["APPLIANCE_PASSPHRASE"] = MARKER
    env["APPLIANCE_PASSPHRASE_FILE"] = str(shared / "pass.fifo")
    return subprocess.Popen([sys.executable, "-c", TARGET.format(uid=NOBODY), kind, *args], env=env,
                            stdin=stdin if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4], line.split()[5]
    raise AssertionError("no core limit line")


def _uid(pid: int) -> int:
    """The real uid of a process, from its status (not from file owners, which non-dumpable changes)."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    return int(line.split()[1])


def _protected(pid: int, timeout: float = 60.0) -> bool:
    """Wait until the process has protected itself (it does so first thing), or say it never did."""
    want = NOBODY if os.geteuid() == 0 else os.geteuid()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _uid(pid) == want and _core_limit(pid) == ("0", "0") and os.stat(f"/proc/{pid}/environ").st_uid == 0:
                return True
        except (FileNotFoundError, ProcessLookupError):
            return False
        time.sleep(0.05)
    return False


def _neighbour_reads_environ(pid: int) -> bool:
    """A process with the target's uid tries /proc/PID/environ: True if it found the passphrase there."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 2
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
            with open(f"/proc/{pid}/environ", "rb") as f:
                code = 0 if MARKER.encode() in f.read() else 3
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def shared():
    """A folder both uids can use, with the FIFO the passphrase is read from (nobody ever writes it)."""
    d = Path(tempfile.mkdtemp(prefix="appliance-sec-"))
    d.chmod(0o777)
    fifo = d / "pass.fifo"
    os.mkfifo(fifo, 0o666)
    fifo.chmod(0o666)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _check(proc: subprocess.Popen) -> None:
    try:
        protected = _protected(proc.pid)
        assert proc.poll() is None, f"the process ended early: {proc.stderr.read().decode()[-500:]}"
        assert protected, "the key holder stayed dumpable or kept a core limit"
        uid = _uid(proc.pid)
        assert uid != 0
        assert _core_limit(proc.pid) == ("0", "0")
        assert not _neighbour_reads_environ(proc.pid), f"a process of uid {uid} read the passphrase"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_the_cli_waiting_for_its_passphrase_is_not_readable_and_dumps_no_core(shared):
    _check(_start("cli", ["--home", str(shared / "home"), "init"], shared))


def test_a_job_runner_waiting_for_its_key_is_not_readable_and_dumps_no_core(shared):
    r, w = os.pipe()  # the runner reads its key from stdin; nothing is ever written
    try:
        _check(_start("runner", [str(shared / "home"), "job-1"], shared, stdin=r))
    finally:
        os.close(r)
        os.close(w)


def test_the_attack_succeeds_against_an_unprotected_process(shared):
    """The check above is real: the same neighbour does read a process that did not protect itself."""
    env = python_env()
    env["APPLIANCE_PASSPHRASE"] = MARKER
    script = TARGET.format(uid=NOBODY).split("if sys.argv[1]")[0] + "import time; time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        want = NOBODY if os.geteuid() == 0 else os.geteuid()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _uid(proc.pid) != want:
            time.sleep(0.05)
        assert _neighbour_reads_environ(proc.pid)
    finally:
        proc.kill()
        proc.wait()


# A scan pool started where the operator stands: a folder there named like a module is not imported by the
# fork server, its workers or the resource tracker; they hold no passphrase and are protected as the ingest
# process is. The script opens a vault first, as every ingest does (that is what protects the process).
POOL = """
import os, sys
from pathlib import Path
from appliance.home import Home
from appliance.vault import Vault
from appliance.vault.scan import pool
os.chdir(sys.argv[1])
def probe():
    from appliance import hardening
    seen = [open(f"/proc/{p}/environ", "rb").read() for p in ("self", os.getppid())]  # the worker's, the server's
    held = any(b"{MARKER}" in e for e in seen) or "APPLIANCE_PASSPHRASE" in os.environ
    return held, hardening.is_protected(), os.getppid()
if __name__ == "__main__":
    with Vault.init(Home(Path(sys.argv[2])), "{MARKER}"):
        with pool(2) as ex:
            print(repr([r[:2] + (r[2] != os.getpid(),) for r in [ex.submit(probe).result() for _ in range(2)]]))
"""


def _hostile(tmp_path: Path, names: tuple[str, ...]) -> tuple[Path, Path]:
    """A folder holding packages named `names` that leave a mark when imported, and where that mark goes."""
    here, marker = tmp_path / "repo", tmp_path / "ran"
    for name in names:
        (here / name).mkdir(parents=True)
        (here / name / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    return here, marker


def _clean_env() -> dict:
    """The tests' environment without what the appliance sets for itself, and with the repository alone on the
    path (an empty entry would name the current directory)."""
    env = dict(python_env(), APPLIANCE_PASSPHRASE=MARKER, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("PYTHONSAFEPATH", None)
    return env


def test_scan_workers_import_nothing_from_the_cwd_and_hold_no_passphrase(tmp_path):
    here, marker = _hostile(tmp_path, ("appliance", "multiprocessing"))  # an operator ingesting a repository
    script = tmp_path / "pool_probe.py"
    script.write_text(POOL.replace("{MARKER}", MARKER))
    r = subprocess.run([sys.executable, str(script), str(here), str(tmp_path / "home")], env=_clean_env(),
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), f"code from the current directory ran: {marker.read_text()}"
    got = eval(r.stdout.strip().splitlines()[-1])
    # no passphrase, not even in what the worker and the server were started with; not dumpable; not forked
    # from the ingest process
    assert got == [(False, True, True)] * 2, got


def test_a_python_program_a_key_holder_starts_imports_nothing_from_the_cwd(tmp_path):
    """`python -m` puts the current directory first on the path: the job runner, torchrun and its ranks are
    started that way by a process that holds keys."""
    here, marker = _hostile(tmp_path, ("json",))
    code = ("import subprocess, sys; from appliance.hardening import protect_process; protect_process(); "
            "subprocess.run([sys.executable, '-m', 'json.tool', '--help'], check=True, capture_output=True)")
    r = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=here, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), f"code from the current directory ran: {marker.read_text()}"
