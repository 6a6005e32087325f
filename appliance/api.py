"""The Python API: the CLI's commands as functions over an unlocked vault, returning what `--json` prints.

    from appliance import api
    with api.open("/srv/appliance", passphrase) as v:
        api.vault_datasets(v)                    # == appliance vault datasets --json (less "ok", "schema")
        job = api.jobs_submit(v, "tiny-dense", overrides=["train.max_steps=100"])
        api.jobs_logs(v, job["id"])

Names follow the commands (`vault ingest` -> `vault_ingest`), arguments their options, results their JSON
shapes (documented in docs/API.md). The CLI and the MCP server call these same functions. Errors are
`ApplianceError`s with `.message` and `.hint`, as the CLI prints them.
"""

from __future__ import annotations

from pathlib import Path

from appliance.home import Home


def open(home: str | Path, passphrase: str, read_only: bool = False):  # noqa: A001 - mirrors Vault.open
    """The unlocked vault (a context manager) that every function here takes first."""
    from appliance.vault import Vault

    return Vault.open(Home(Path(home).expanduser().absolute()), passphrase, read_only=read_only)


# --- vault -------------------------------------------------------------------------------------------
def vault_datasets(v) -> dict:
    from appliance.vault import versions

    return {"datasets": versions.datasets(v.con)}


def vault_show(v, ref: str) -> dict:
    from appliance.vault import versions

    return versions.show(v.con, ref)


def vault_records(v, ref: str, offset: int = 0, limit: int = 20, text: bool = True) -> dict:
    """A page of a version's records, with their (scrubbed) text unless `text` is false."""
    from appliance.vault import versions

    page = versions.records_page(v.con, ref, offset, limit)
    if text:
        page = [versions.record(v.con, ref, r["ord"]) | {"split": r["split"]} for r in page]
    return {"version": versions.show(v.con, ref)["version"], "offset": offset, "records": page}


def vault_sql(v, query: str, limit: int = 100) -> dict:
    from appliance.vault import versions

    return versions.query(v, query, limit)


def vault_ingest(v, paths: list[str | Path], dataset: str, pii: str = "redact", validation: float = 0.05,
                 replace: bool = False) -> dict:
    from appliance.vault.ingest import ingest, validate_name

    validate_name(dataset)
    return ingest(v, [Path(p) for p in paths], dataset, pii, validation, replace).to_json()


# --- train, models, lineage, audit -------------------------------------------------------------------
def train_models(v) -> dict:
    from appliance.train.run import models

    return {"models": models(v.con)}


def train_runs(v, name: str | None = None) -> dict:
    from appliance.train.run import runs

    return {"runs": runs(v.con, name)}


def lineage(v, node_id: str) -> dict:
    from appliance.vault import lineage as lin

    return {"lineage": lin.tree(v.con, lin.resolve(v.con, node_id))}


def audit_log(v, limit: int = 50, action: str | None = None) -> dict:
    from appliance.vault import audit

    return {"entries": audit.entries(v.con, limit, action)}


# --- jobs --------------------------------------------------------------------------------------------
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


def jobs_sweep(v, name: str, recipe: str, space: dict[str, list], overrides: list[str] | None = None,
               method: str = "grid", trials: int | None = None, seed: int = 0, gpus: int = 0,
               priority: int = 0) -> dict:
    """Queue a hyperparameter sweep (as `appliance jobs sweep FILE`, with the file's keys as arguments)."""
    raw = {"name": name, "recipe": recipe, "space": space, "overrides": overrides or [], "method": method,
           "seed": seed, **({"trials": trials} if trials is not None else {})}
    return _submit(v, "sweep", raw, gpus, priority)


def _submit(v, kind: str, spec: dict, gpus: int, priority: int) -> dict:
    from appliance.jobs import queue
    from appliance.jobs.dispatch import dispatch

    job = queue.submit(v, kind, spec, gpus, priority)
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


# --- bundles -----------------------------------------------------------------------------------------
def bundle_export(v, ref: str, sign_key: str, out: str | Path, to: list[str | Path] | None = None,
                  expires_days: float = 365) -> dict:
    from appliance.exchange import export_bundle

    return export_bundle(v, ref, sign_key, [Path(p) for p in to or []], Path(out).expanduser().absolute(),
                         expires_days)
