"""The job rows in the vault: submit, list, cancel, and the transitions a runner makes.

States: queued -> running -> done | failed | interrupted | cancelled. A queued job can be cancelled at
once; a running one is asked to stop (a training job stops at a checkpoint) and ends as cancelled.
"""

from __future__ import annotations

import contextvars
import copy
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.db_time import iso, utcnow
from appliance.errors import UsageError
from appliance.vault.audit import current_actor

KINDS = ("train", "quantize", "eval", "sweep")
FINAL = ("done", "failed", "interrupted", "cancelled")
# The grant an agent's call runs under (set by the MCP server for the call): jobs it queues record it in their
# spec ("grant"), so they are cancelled when that grant is revoked or expires (grants.cancel_jobs).
SUBMITTING_GRANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("submitting_grant", default=None)
COLUMNS = ("id", "kind", "spec", "status", "priority", "gpus", "devices", "pid", "attempts", "cancel",
           "submitted_by", "created", "started", "finished", "ref", "result", "error")


@dataclass
class Job:
    id: str
    kind: str
    spec: dict
    status: str
    priority: int
    gpus: int
    devices: str | None
    pid: int | None
    attempts: int
    cancel: bool
    submitted_by: str
    created: object
    started: object
    finished: object
    ref: str | None
    result: dict | None
    error: str | None

    @property
    def active(self) -> bool:
        return self.status not in FINAL

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        for k in ("created", "started", "finished"):
            d[k] = iso(d[k])
        return d

    def describe(self) -> str:
        return describe(self.kind, self.spec)


def describe(kind: str, spec: dict) -> str:
    """What a job does, in a few words: `train tiny-dense`, `quantize pilot@1 q4_k_m`."""
    if kind == "train":
        resume = f" (resume {spec.get('run') or 'newest'})" if spec.get("resume") else ""
        return f"train {spec['name']}{resume}"
    if kind == "quantize":
        return f"quantize {spec['model']} {spec['type']}"
    if kind == "sweep":
        return f"sweep {spec['name']} ({len(spec['points'])} trials, {spec['method']})"
    return f"eval {spec['suite']} on {spec['model']}"


def _row(r) -> Job:
    d = dict(zip(COLUMNS, r))
    d["spec"] = json.loads(d["spec"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return Job(**d)


def get(con, job_id: str) -> Job:
    r = con.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", [job_id]).fetchone()
    if r is None:
        raise UsageError(f"no job {job_id}", "list them with `appliance jobs list`")
    return _row(r)


def listing(con, status: tuple[str, ...] = (), limit: int = 200) -> list[Job]:
    """Newest first; only the given states when `status` is set."""
    where = f" WHERE status IN ({', '.join('?' * len(status))})" if status else ""
    rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs{where} ORDER BY seq DESC LIMIT ?",
                       [*status, limit]).fetchall()
    return [_row(r) for r in rows]


def check_spec(kind: str, spec: dict) -> dict:
    """The spec made self-contained: a recipe or suite file is read now, so later edits don't change the job."""
    if kind not in KINDS:
        raise UsageError(f"unknown job kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if kind == "train":
        from appliance.train.config import build_recipe, load_recipe

        ref, overrides = spec["recipe"], spec.get("overrides") or []
        recipe = build_recipe(copy.deepcopy(ref), overrides) if isinstance(ref, dict) else load_recipe(ref, overrides)
        return {"name": recipe.name, "recipe": recipe.to_dict(), "resume": bool(spec.get("resume")),
                "run": spec.get("run")}
    if kind == "sweep":
        from appliance.train.sweep import from_dict, load

        if "points" in spec:  # already drawn (a recovered or resubmitted sweep)
            return spec
        return load(spec["file"]) if "file" in spec else from_dict(spec)
    if kind == "quantize":
        from appliance.quantize import types

        types.get(spec.get("type") or "q4_k_m")
        return {"model": spec["model"], "type": spec.get("type") or "q4_k_m", "imatrix": spec.get("imatrix"),
                "eval": spec.get("eval")}
    from appliance.eval.suite import DATASET_REF, load

    suite = spec["suite"]
    if not DATASET_REF.match(suite):
        load(suite)  # a malformed suite is refused now, not when the job runs
        if Path(suite).suffix == ".toml":
            suite = str(Path(suite).absolute())
    return {"suite": suite, "model": spec["model"]}


def submit(vault, kind: str, spec: dict, gpus: int = 0, priority: int = 0) -> Job:
    """Queue a job; `dispatch` starts it when the GPUs (or a CPU slot) it needs are free."""
    if not 0 <= gpus <= 64:
        raise UsageError(f"--gpus {gpus} is out of range", "ask for 0 (CPU) to 64 GPUs")
    spec = check_spec(kind, spec)
    if grant := SUBMITTING_GRANT.get():
        spec = {**spec, "grant": grant}
    con = vault.con
    if kind == "sweep":
        _new_sweep_name(con, spec["name"])
    with vault.transaction():
        seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM jobs").fetchone()[0]
        job_id = f"job-{seq}"
        con.execute("INSERT INTO jobs (id, seq, kind, spec, status, priority, gpus, attempts, cancel, "
                    "submitted_by, created) VALUES (?, ?, ?, ?, 'queued', ?, ?, 0, false, ?, ?)",
                    [job_id, seq, kind, json.dumps(spec), priority, gpus, current_actor(), utcnow()])
        vault.audit("jobs.submit", [job_id], {"kind": kind, "gpus": gpus, "priority": priority,
                                              "what": describe(kind, spec)})
    return get(con, job_id)


def _new_sweep_name(con, name: str) -> None:
    """A sweep's trials are found again by name after a restart, so a name is used by one sweep only."""
    used = con.execute("SELECT 1 FROM train_runs WHERE starts_with(name, ?) UNION ALL SELECT 1 FROM lineage_nodes "
                       "WHERE starts_with(id, ?) UNION ALL SELECT 1 FROM jobs WHERE kind = 'sweep' AND "
                       "json_extract_string(spec, '$.name') = ? LIMIT 1", [f"{name}-t", f"{name}@", name]).fetchone()
    if used:
        raise UsageError(f"the name {name!r} is used by an earlier sweep or its trials", "give the sweep a new name")


def resubmit(vault, job_id: str) -> Job:
    """Queue a stopped training job again, resuming its run from the last checkpoint."""
    old = get(vault.con, job_id)
    if old.kind != "train" or old.status not in ("interrupted", "failed", "cancelled"):
        raise UsageError(f"{job_id} is a {old.kind} job and {old.status}; only a stopped training job resumes",
                         "submit a new job instead")
    if not old.ref:
        raise UsageError(f"{job_id} stopped before its run began", "submit it again instead")
    taken = [j.id for j in listing(vault.con, ("queued", "running")) if old.ref in (j.ref, j.spec.get("run"))]
    if taken:
        raise UsageError(f"{old.ref} is already being resumed by {taken[0]}", f"follow {taken[0]} instead")
    return submit(vault, "train", {"recipe": old.spec["recipe"], "resume": True, "run": old.ref}, old.gpus,
                  old.priority)


def cancel(vault, job_id: str, reason: str | None = None) -> Job:
    """A queued job ends now; a running one is asked to stop and ends as cancelled (`reason` in the audit)."""
    import os
    import signal

    job = get(vault.con, job_id)
    if not job.active:
        raise UsageError(f"{job_id} has already ended ({job.status})", "nothing to cancel")
    with vault.transaction():
        if job.status == "queued":
            vault.con.execute("UPDATE jobs SET status = 'cancelled', cancel = true, finished = ?, error = ? "
                              "WHERE id = ?", [utcnow(), reason, job_id])
        else:
            vault.con.execute("UPDATE jobs SET cancel = true WHERE id = ?", [job_id])
        vault.audit("jobs.cancel", [job_id], {"was": job.status, **({"reason": reason} if reason else {})})
    if job.status == "running" and job.pid:
        from appliance.jobs.dispatch import runner_alive

        if runner_alive(job.pid, job_id):
            try:
                os.kill(job.pid, signal.SIGINT)  # a training job stops at its next step, at a checkpoint
            except ProcessLookupError:  # it ended in the meantime; the next dispatch settles the row
                pass
    return get(vault.con, job_id)


def set_ref(vault, job_id: str, ref: str) -> None:
    with vault.session() as v:
        v.con.execute("UPDATE jobs SET ref = ? WHERE id = ?", [ref, job_id])


def finish(vault, job_id: str, status: str, result: dict | None = None, error: str | None = None) -> Job:
    con = vault.con
    job = get(con, job_id)
    if job.cancel and status in ("interrupted", "failed"):
        status = "cancelled"
    with vault.transaction():
        con.execute("UPDATE jobs SET status = ?, finished = ?, result = ?, error = ?, pid = NULL WHERE id = ?",
                    [status, utcnow(), json.dumps(result) if result is not None else None, error, job_id])
        vault.audit(f"jobs.{status}", [job_id, *([job.ref] if job.ref else [])], {"error": error} if error else {})
    return get(con, job_id)
