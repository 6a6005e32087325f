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

from appliance import refs
from appliance.db_time import iso, utcnow
from appliance.errors import UsageError
from appliance.grant_status import ended
from appliance.jobs.pids import runner_alive
from appliance.vault.audit import actor_of

KINDS = ("train", "quantize", "eval", "sweep")
FINAL = ("done", "failed", "interrupted", "cancelled")
# The grant an agent's call runs under (set by the MCP server for the call): jobs it queues record it in their
# spec ("grant"), so they are cancelled when that grant is revoked or expires (cancel_for_ended_grants).
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


def check_spec(kind: str, spec: dict, vault=None) -> dict:
    """The spec made self-contained: a recipe or suite file is read now, so later edits don't change the job;
    with a `vault`, what a quantize or eval job names is resolved now too (`appliance.refs`: NAME is the newest
    NAME@K when the job is queued), so a mistake is refused at once and the job runs what was checked."""
    if kind not in KINDS:
        raise UsageError(f"unknown job kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if kind == "train":
        from appliance.train.config import build_recipe, load_recipe

        ref, overrides = spec["recipe"], spec.get("overrides") or []
        recipe = build_recipe(copy.deepcopy(ref), overrides) if isinstance(ref, dict) else load_recipe(ref, overrides)
        if vault is not None:
            _check_inputs(vault.con, recipe)
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
        model, imatrix, data = spec["model"], spec.get("imatrix"), spec.get("eval")
        if vault is not None:
            model = refs.model(vault.con, model)
            imatrix = refs.dataset(vault.con, imatrix) if imatrix else imatrix
            data = refs.dataset(vault.con, data) if data else data
        return {"model": model, "type": spec.get("type") or "q4_k_m", "imatrix": imatrix, "eval": data}
    from appliance.eval.suite import load

    suite, model = spec["suite"], spec["model"]
    if refs.is_dataset_suite(suite):
        suite = refs.dataset(vault.con, suite) if vault is not None else suite
    else:
        load(suite)  # a malformed suite is refused now, not when the job runs
        if Path(suite).suffix == ".toml":
            suite = str(Path(suite).absolute())
    if vault is not None:
        from appliance.eval.run import resolve_model

        model = resolve_model(vault, model)[0]  # an id, or a model directory's or GGUF file's absolute path
    return {"suite": suite, "model": model}


def _check_inputs(con, recipe) -> None:
    """What a training run will read exists now (`appliance.refs`; the run resolves them again when it starts,
    as `train run` does): a mistyped base, tokenizer or dataset is refused at once, not when the job runs."""
    if recipe.stage == "pretrain":
        refs.tokenizer(con, recipe.data.tokenizer)
    else:
        refs.node(con, recipe.model.base, ("model",), "base model")
    for ref in recipe.data.datasets:
        refs.dataset(con, ref)


def submit(vault, kind: str, spec: dict, gpus: int = 0, priority: int = 0) -> Job:
    """Queue a job; `dispatch` starts it when the GPUs (or a CPU slot) it needs are free."""
    if not 0 <= gpus <= 64:
        raise UsageError(f"--gpus {gpus} is out of range", "ask for 0 (CPU) to 64 GPUs")
    spec = check_spec(kind, spec, vault)
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
                    [job_id, seq, kind, json.dumps(spec), priority, gpus, actor_of(vault), utcnow()])
        vault.audit("jobs.submit", [job_id], {"kind": kind, "gpus": gpus, "priority": priority,
                                              "what": describe(kind, spec)})
    return get(con, job_id)


def _new_sweep_name(con, name: str) -> None:
    """A sweep's trials are found again by name after a restart, so a name is used by one sweep only."""
    from appliance.vault import lineage

    used = con.execute("SELECT 1 FROM train_runs WHERE starts_with(name, ?) UNION ALL SELECT 1 FROM jobs "
                       "WHERE kind = 'sweep' AND json_extract_string(spec, '$.name') = ? LIMIT 1",
                       [f"{name}-t", name]).fetchone()
    if used or lineage.name_used(con, name):
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
        if runner_alive(job.pid, job_id):
            try:
                os.kill(job.pid, signal.SIGINT)  # a training job stops at its next step, at a checkpoint
            except ProcessLookupError:  # it ended in the meantime; the next dispatch settles the row
                pass
    return get(vault.con, job_id)


def cancel_for_ended_grants(vault, gid: str | None = None) -> list[str]:
    """Cancel the active jobs queued under grant `gid` (under every ended grant when None), if it has ended;
    the ids cancelled (grants.cancel_jobs; every dispatch)."""
    gone = ended(vault.con, gid)
    done = []
    for job in listing(vault.con, ("queued", "running"), limit=10_000):
        g = job.spec.get("grant") if isinstance(job.spec, dict) else None
        if g in gone and not job.cancel:
            cancel(vault, job.id, reason=f"grant {g} {gone[g].split(' at ')[0]}")
            done.append(job.id)
    return done


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
