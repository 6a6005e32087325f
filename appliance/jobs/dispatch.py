"""The scheduler: hands the box's GPUs to queued jobs and starts a detached runner for each.

There is no resident daemon. Whoever changes the queue (a submit, a runner that finishes, `jobs list`,
the console) calls `dispatch` while it holds the vault; DuckDB lets one process write at a time, so two
dispatches never hand out the same GPU. `work` (`appliance jobs work`) calls it in a loop for a box that
should pick up its queue after a reboot without anyone logging in.

Capacity: the GPUs of this box (APPLIANCE_GPUS overrides the count), each given to one job at a time
through CUDA_VISIBLE_DEVICES; jobs that ask for no GPU share APPLIANCE_CPU_JOBS slots (default 1).
Jobs start in priority order, then oldest first; a smaller job may start beside a running one when it
fits, but never ahead of a waiting job of higher priority that would fit too. Quantize and eval jobs run
alone: they use every core, and one export at a time writes into artifacts/gguf.

Recovery: a job marked running whose runner is gone (the box restarted, the process was killed) is
queued again; a training job then resumes from its last checkpoint. After MAX_ATTEMPTS it is failed.

Agents: a job queued under a grant that has since been revoked or has expired is cancelled before anything
starts (queue.cancel_for_ended_grants). A runner's environment holds no passphrase, grant token or API key
(SECRET_ENV): it gets the vault's secrets on a pipe, and what it runs (a model's tool calls, a task's
modules) must find nothing in its /proc files either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from appliance import logs
from appliance.db_time import utcnow
from appliance.errors import ApplianceError
from appliance.jobs import queue
from appliance.jobs.log import JobLog
from appliance.jobs.pids import runner_alive

MAX_ATTEMPTS = 3
# Kinds that run alone: llama.cpp and the reference model take every core, and exports share one lock.
RUN_ALONE = ("quantize", "eval")
SECRET_ENV = ("APPLIANCE_PASSPHRASE", "APPLIANCE_PASSPHRASE_FILE", "APPLIANCE_NEW_PASSPHRASE",
              "APPLIANCE_NEW_PASSPHRASE_FILE", "APPLIANCE_KEY_PASSPHRASE", "APPLIANCE_KEY_PASSPHRASE_FILE",
              "APPLIANCE_GRANT", "APPLIANCE_GRANT_FILE", "APPLIANCE_API_KEY", "APPLIANCE_API_KEY_FILE")


def gpu_count() -> int:
    """GPUs on this box, without importing torch: APPLIANCE_GPUS, else the NVIDIA driver's list."""
    if env := os.environ.get("APPLIANCE_GPUS"):
        return max(0, int(env))
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def cpu_slots() -> int:
    return max(1, int(os.environ.get("APPLIANCE_CPU_JOBS") or 1))


def dispatch(vault) -> list[str]:
    """Recover orphaned jobs, then start every queued job that fits; returns the ids started."""
    started = []
    with vault.session() as v:
        queue.cancel_for_ended_grants(v)  # an agent's jobs end with its grant (revoked, or expired since queued)
        _recover(v)
        running = queue.listing(v.con, ("running",))
        total, slots = gpu_count(), cpu_slots()
        busy = {int(d) for j in running if j.devices for d in j.devices.split(",")}
        free = [i for i in range(total) if i not in busy]
        cpu_free = slots - sum(1 for j in running if j.gpus == 0)
        waiting = sorted(queue.listing(v.con, ("queued",), limit=10_000), key=lambda j: (-j.priority, j.created))
        blocked_priority = None
        alone = any(j.kind in RUN_ALONE for j in running)
        for job in waiting:
            if alone:
                break
            if job.gpus > total:
                if total:  # no GPU seen at all may be a driver still loading at boot: keep waiting
                    _fail(v, job, f"asks for {job.gpus} GPU(s); this box has {total}")
                continue
            if blocked_priority is not None and job.priority < blocked_priority:
                break
            fits = cpu_free > 0 if job.gpus == 0 else job.gpus <= len(free)
            if job.kind in RUN_ALONE:
                fits = fits and not running and not started
            if not fits:
                blocked_priority = job.priority if blocked_priority is None else blocked_priority
                continue
            devices = free[:job.gpus]
            free = free[job.gpus:]
            cpu_free -= job.gpus == 0
            _start(v, job, devices)
            started.append(job.id)
            alone = job.kind in RUN_ALONE
    return started


def work(vault, every: float, on_started: Callable[[str], None] = lambda job_id: None,
         on_error: Callable[[Exception], None] = lambda e: None, stop: Callable[[], bool] = lambda: False,
         sleep: Callable[[float], None] = time.sleep) -> None:
    """Keep the queue moving: `dispatch` every `every` seconds until `stop()` is true (or Ctrl-C).

    This is `appliance jobs work`, run as a service so that a rebooted box picks up its queue. A busy vault
    or a runner that failed to start goes to `on_error` and is tried again on the next round; every job
    started goes to `on_started`. Running jobs go on when the loop ends.
    """
    while not stop():
        try:
            for job_id in dispatch(vault):
                on_started(job_id)
        except (ApplianceError, OSError) as e:  # busy, or a runner that failed to start: try again later
            on_error(e)
        sleep(every)


def _recover(vault) -> None:
    for job in queue.listing(vault.con, ("running",)):
        if job.pid and runner_alive(job.pid, job.id):
            continue
        log = JobLog(vault.home.logs, job.id, vault.secrets.data_key)
        if job.cancel:
            log.write("the runner is gone; the job was being cancelled")
            queue.finish(vault, job.id, "cancelled", error="the runner stopped while cancelling")
        elif job.attempts >= MAX_ATTEMPTS:
            log.write(f"the runner is gone after {job.attempts} attempts; giving up")
            queue.finish(vault, job.id, "failed", error=f"the runner stopped {job.attempts} times")
        else:
            spec = {**job.spec, "resume": True, "run": job.ref} if job.kind == "train" and job.ref else job.spec
            log.write("the runner is gone (restart or kill); queued again"
                      + (", to resume from the last checkpoint" if spec is not job.spec else ""))
            with vault.transaction():
                vault.con.execute("UPDATE jobs SET status = 'queued', pid = NULL, devices = NULL, spec = ? "
                                  "WHERE id = ?", [json.dumps(spec), job.id])
                vault.audit("jobs.recover", [job.id], {"attempts": job.attempts})


def _fail(vault, job: queue.Job, why: str) -> None:
    JobLog(vault.home.logs, job.id, vault.secrets.data_key).write(why)
    queue.finish(vault, job.id, "failed", error=why)


def runner_env(job: queue.Job, devices: list[int]) -> dict[str, str]:
    """The environment a job's runner starts with: ours without any secret, plus its devices and actor."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))  # "" for a CPU job: it must not take a GPU
    env["APPLIANCE_ACTOR"] = f"{job.submitted_by} ({job.id})"
    return env


def _start(vault, job: queue.Job, devices: list[int]) -> None:
    env = runner_env(job, devices)
    home = str(vault.home.root)
    # The runner gets the vault's secrets on a pipe, never on its command line or in a file.
    proc = subprocess.Popen([sys.executable, "-m", "appliance.jobs.runner", home, job.id], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=home,
                            start_new_session=True)
    proc.stdin.write(vault.secrets.to_bytes())
    proc.stdin.close()
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it ends before we do
    with vault.transaction():
        vault.con.execute("UPDATE jobs SET status = 'running', pid = ?, devices = ?, started = ?, "
                          "attempts = attempts + 1 WHERE id = ?",
                          [proc.pid, ",".join(map(str, devices)) or None, utcnow(), job.id])
        vault.audit("jobs.start", [job.id], {"devices": devices, "pid": proc.pid})
    logs.event("job.start", job=job.id, kind=job.kind, devices=devices, pid=proc.pid)

