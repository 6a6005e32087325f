"""Jobs: training, quantize, eval and sweeps queued for detached runners; list, show, logs, cancel, resume."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path


def jobs_submit(v, recipe: str | dict, overrides: list[str] | None = None, gpus: int = 0, priority: int = 0,
                resume: bool = False) -> dict:
    """Queue a training run (and start it if it fits)."""
    return _submit(v, "train", {"recipe": recipe, "overrides": overrides or [], "resume": resume}, gpus, priority)


def jobs_quantize(v, model: str, type: str = "q4_k_m", imatrix: str | None = None,  # noqa: A002
                  eval: str | None = None) -> dict:  # noqa: A002
    """Queue a GGUF export of `model` (as `appliance quantize`, in a job)."""
    return _submit(v, "quantize", {"model": model, "type": type, "imatrix": imatrix, "eval": eval}, 0, 0)


def jobs_eval(v, suite: str, model: str) -> dict:
    """Queue an eval run (as `appliance eval run`, in a job)."""
    return _submit(v, "eval", {"suite": suite, "model": model}, 0, 0)


def jobs_sweep(v, name: str | None = None, recipe: str | None = None, space: dict[str, list] | None = None,
               overrides: list[str] | None = None, method: str = "grid", trials: int | None = None, seed: int = 0,
               gpus: int = 0, priority: int = 0, file: str | Path | None = None) -> dict:
    """Queue a hyperparameter sweep: from a sweep `file` (as `appliance jobs sweep FILE`), or from its keys
    given as arguments (name, recipe, space, ...)."""
    if file is not None:
        return _submit(v, "sweep", {"file": str(file)}, gpus, priority)
    raw = {"name": name, "recipe": recipe, "space": space or {}, "overrides": overrides or [], "method": method,
           "seed": seed, **({"trials": trials} if trials is not None else {})}
    return _submit(v, "sweep", raw, gpus, priority)


def jobs_resume(v, job_id: str) -> dict:
    """Queue a stopped training job again; its run continues from the last checkpoint."""
    from appliance.jobs import queue
    from appliance.jobs.dispatch import dispatch

    job = queue.resubmit(v, job_id)
    dispatch(v)
    return queue.get(v.con, job.id).to_json()


def jobs_list(v, all: bool = False, dispatch: bool = True) -> dict:  # noqa: A002 - the CLI's --all
    """Jobs; first (unless `dispatch` is false) recovers orphans and starts what fits, as `jobs list` does."""
    from appliance.jobs import queue
    from appliance.jobs.dispatch import dispatch as dispatch_queue

    if dispatch and not v.read_only:
        dispatch_queue(v)
    return {"jobs": [j.to_json() for j in queue.listing(v.con, () if all else ("running", "queued"))]}


def jobs_show(v, job_id: str) -> dict:
    from appliance.jobs import queue

    return queue.get(v.con, job_id).to_json()


def jobs_logs(v, job_id: str) -> dict:
    from appliance.jobs import queue
    from appliance.jobs.log import JobLog

    job = queue.get(v.con, job_id)
    return {"id": job_id, "status": job.status, "lines": JobLog(v.home.logs, job_id, v.secrets.data_key).lines()}


def jobs_cancel(v, job_id: str) -> dict:
    from appliance.jobs import queue

    return queue.cancel(v, job_id).to_json()


def _submit(v, kind: str, spec: dict, gpus: int, priority: int) -> dict:
    from appliance.jobs import queue
    from appliance.jobs.dispatch import dispatch

    job = queue.submit(v, kind, spec, gpus, priority)
    dispatch(v)
    return queue.get(v.con, job.id).to_json()


def jobs_check(kind: str, spec: dict) -> dict:
    """A job's spec (kind "train", "quantize", "eval" or "sweep") checked and made self-contained, as submitting
    it would (a recipe or sweep file is read now): a bad one is refused before a vault is opened."""
    from appliance.jobs import queue

    return queue.check_spec(kind, spec)


def jobs_describe(kind: str, spec: dict) -> str:
    """What a job does, in a few words (`train tiny-dense`, `quantize pilot@1 q4_k_m`), from a job's `kind` and
    `spec` as the jobs_* functions return them."""
    from appliance.jobs import queue

    return queue.describe(kind, spec)


def jobs_follow(v, job_id: str, on_gone: Callable[[], None] | None = None) -> Iterator[str]:
    """A job's log lines as they are written, until the job ends (`jobs_logs` once more gives them all).

    `v` may be closed: it is opened read-only for a moment at each look at the job, and a job holding the
    vault only means another look later. `on_gone()` is called when the job's runner process is gone while
    the job says it runs (`jobs_list` recovers such a job); following stops there."""
    from appliance.errors import VaultBusy
    from appliance.jobs import queue
    from appliance.jobs.log import JobLog
    from appliance.jobs.pids import runner_alive

    def ended() -> bool:
        try:
            with v.session(read_only=True, wait=5):
                j = queue.get(v.con, job_id)
        except VaultBusy:  # a job holds the vault for now: ask again on the next poll
            return False
        if j.status == "running" and j.pid and not runner_alive(j.pid, job_id):
            if on_gone is not None:
                on_gone()
            return True
        return not j.active

    yield from JobLog(v.home.logs, job_id, v.secrets.data_key).follow(ended)


def jobs_work(v, every: float = 5.0, on_started: Callable[[str], None] | None = None,
              on_error: Callable[[Exception], None] | None = None) -> None:
    """Keep the queue moving until Ctrl-C (`appliance jobs work`): start what fits every `every` seconds.

    A busy vault or a runner that failed to start goes to `on_error(e)` and is tried again next round; each
    job started goes to `on_started(job_id)`. Running jobs go on when the loop ends."""
    from appliance.jobs.dispatch import work

    work(v, every, on_started=on_started or (lambda job_id: None), on_error=on_error or (lambda e: None))
