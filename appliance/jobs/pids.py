"""Whether a job's runner process is still alive: read by the queue (cancel) and the dispatcher (recovery)."""

from __future__ import annotations


def runner_alive(pid: int, job_id: str) -> bool:
    """Whether `pid` is still the runner of `job_id` (not a stranger that reused the number, not a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except PermissionError:  # hidden from us (hidepid): it exists, so count it alive rather than run it twice
        return True
    except OSError:
        return False
    return b"appliance.jobs.runner" in argv and job_id.encode() in argv
