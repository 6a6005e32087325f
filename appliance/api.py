"""The Python API: the CLI's commands as functions over an unlocked vault, returning what `--json` prints.

    from appliance import api
    with api.open("/srv/appliance", passphrase) as v:
        api.vault_datasets(v)                    # == appliance vault datasets --json (less "ok", "schema")
        job = api.jobs_submit(v, "tiny-dense", overrides=["train.max_steps=100"])
        api.jobs_logs(v, job["id"])

Names follow the commands (`vault ingest` -> `vault_ingest`), arguments their options, results their JSON
shapes (documented in docs/API.md). The CLI and the MCP server call these same functions. Errors are
`ApplianceError`s with `.message` and `.hint`, as the CLI prints them. A check that finds problems
(`vault_check`, `audit_verify`, `eval_gate`, `eval_drift`, a flagged `quantize`) is not an error: its
report comes back with `"ok": false`, where the CLI would exit 1.

Long work (`train_run`, `quantize`, `eval_run`, `vault_ingest`) runs in the calling process; the `jobs_*`
functions queue the same work for a detached runner instead.
"""

from __future__ import annotations

from pathlib import Path

from appliance.home import Home


def open(home: str | Path, passphrase: str, read_only: bool = False):  # noqa: A001 - mirrors Vault.open
    """The unlocked vault (a context manager) that every function here takes first."""
    from appliance.vault import Vault

    return Vault.open(Home(Path(home).expanduser().absolute()), passphrase, read_only=read_only)


# --- the box ----------------------------------------------------------------------------------------------
def doctor(home: str | Path, passphrase: str | None = None) -> dict:
    """Every check of the box (no vault needed; with a passphrase the vault is checked read-only too)."""
    from appliance.doctor import run

    return run(Home(Path(home).expanduser().absolute()), passphrase)


def wheelhouse_build(out: str | Path, torch: str | None = None, from_env: bool = False,
                     find_links: list[str | Path] | None = None, no_index: bool = False,
                     torch_index: str | None = None, sign_key: str | None = None, bundle: str | Path | None = None,
                     force: bool = False, home: str | Path | None = None, compress_level: int = 1,
                     progress=None) -> dict:
    """Every wheel the appliance runs on, hash-pinned, with an install script (and, with `sign_key` and
    `bundle`, one signed installer bundle); `home` holds the signing key."""
    from appliance.home import default_home
    from appliance.wheelhouse import build

    h = Home(Path(home or default_home()).expanduser().absolute())
    return build(Path(out), torch, from_env, [Path(p) for p in find_links or []], no_index, torch_index, sign_key,
                 None if bundle is None else Path(bundle), force, h, progress, compress_level)


def vault_backup(v, out: str | Path, no_checkpoints: bool = False, force: bool = False, progress=None) -> dict:
    """An encrypted, verifiable snapshot of the home to `out`: vault, wrapped keys, models, logs, keys, trust."""
    from appliance.vault.backup import backup

    return backup(v, Path(out), not no_checkpoints, force, **({"progress": progress} if progress else {}))


def vault_restore(backup_file: str | Path, home: str | Path, passphrase: str, force: bool = False) -> dict:
    """A backup brought back as `home` (no open vault: it makes one); checked before it takes the name."""
    from appliance.vault.backup import restore

    return restore(Path(backup_file), Home(Path(home).expanduser().absolute()), passphrase, force)


# --- vault -------------------------------------------------------------------------------------------
def vault_datasets(v) -> dict:
    from appliance.vault import versions

    return {"datasets": versions.datasets(v.con)}


def vault_show(v, ref: str) -> dict:
    from appliance.vault import versions

    return versions.show(v.con, ref)


def vault_records(v, ref: str, offset: int = 0, limit: int = 20, text: bool = True, grep: str | None = None,
                  file: str | None = None) -> dict:
    """A page of a version's records, with their (scrubbed) text unless `text` is false.

    `grep` keeps records whose text contains it (case-insensitive), `file` those from that source file or
    repository path (whole, or its last components); `total` counts every match, not just this page."""
    from appliance.vault import versions

    page = versions.records_page(v.con, ref, offset, limit, grep, file)
    if text:
        page = [versions.record(v.con, ref, r["ord"]) | {"split": r["split"]} for r in page]
    return {"version": versions.show(v.con, ref)["version"], "offset": offset, "records": page,
            "total": versions.count_records(v.con, ref, grep, file)}


def vault_record(v, record_id: str) -> dict:
    """One record (`NAME@N#ORD`, as `vault_records` lists it): its scrubbed text, source path, kind and split."""
    from appliance.vault import versions

    ref, ord_ = versions.record_id(record_id)
    return versions.record(v.con, ref, ord_)


def vault_sql(v, query: str, limit: int = 100) -> dict:
    from appliance.vault import versions

    return versions.query(v, query, limit)


def vault_ingest(v, paths: list[str | Path], dataset: str, pii: str = "redact", validation: float = 0.05,
                 replace: bool = False, workers: int | None = None, progress=None, on_plan=None,
                 follow_links: bool = False) -> dict:
    """Ingest files into a new version; `progress(item)` and `on_plan(total)` see it go (as the CLI's bar).

    A partial ingest (some files unreadable) lands the rest and says so in `partial` and `failed`. Links
    below `paths` are skipped (and listed in `skipped`) unless `follow_links`, which the operator's CLI
    alone passes (never the MCP server); a link into the home is refused either way."""
    from appliance.vault.ingest import ingest, validate_name

    validate_name(dataset)
    return ingest(v, [Path(p) for p in paths], dataset, pii, validation, replace, progress=progress,
                  on_plan=on_plan, workers=workers, follow_links=follow_links).to_json()


def vault_export(v, ref: str, out: str | Path, split: str | None = None, force: bool = False) -> dict:
    """Write a version as plaintext JSONL to `out` (audited before the file appears): the data leaves the vault."""
    from appliance.vault import versions

    def audit(summary: dict) -> None:
        with v.transaction():
            v.audit("vault.export", [summary["version"]], {"out": summary["out"], "records": summary["records"],
                                                            "split": summary["split"]})

    return versions.export(v.con, ref, Path(out), split, force, before_publish=audit)


def vault_check(v) -> dict:
    """Every record against its hash, every version against its records, and the audit chain (audited)."""
    rep = v.check()
    with v.transaction():
        v.audit("vault.check", [], {"ok": rep.ok, "problems": len(rep.problems)})
    return rep.to_json()


def vault_passwd(v, passphrase: str, new_passphrase: str, rekey: bool = False) -> dict:
    """Change the passphrase: re-wraps the keys, the data key stays (no data is re-encrypted).

    `passphrase` is the current one and is checked against the keyring first (`WrongPassphrase`, nothing
    changed). With `rekey`, the data key is rotated too, under the new passphrase (`vault_rekey`): for a
    suspected compromise, where someone may hold the old passphrase and a copy of the keyring.
    """
    from appliance.errors import ApplianceError, VaultError
    from appliance.passphrase import check_new

    new_passphrase = check_new(new_passphrase)
    if rekey:
        v.check_rekeyable()  # refused before the passphrase changes, not half-way
    v.passwd(passphrase, new_passphrase)
    if not rekey:
        return {"changed": True}
    try:
        v.rekey(new_passphrase)
    except ApplianceError as e:
        raise VaultError(f"the passphrase was changed, but the data key was not rotated: {e.message}",
                         f"{e.hint + '; then ' if e.hint else ''}run `appliance vault rekey` "
                         "with the new passphrase") from e
    return {"changed": True, "rekeyed": True}


def vault_rekey(v, passphrase: str) -> dict:
    """Rotate the data key; `passphrase`, the current one, is checked against the keyring first
    (`WrongPassphrase`, nothing changed) and wraps the new key."""
    v.rekey(passphrase)
    return {"rekeyed": True}


def synth_tables(v, source: str, template: str | Path, dataset: str, table: str | None = None,
                 policy: str | Path | None = None, limit: int | None = None, seed: int = 0, pii: str = "redact"
                 ) -> dict:
    """Template question/answer pairs over real rows of a table: a new synthetic version of `dataset`."""
    from appliance.vault import synth
    from appliance.vault.pii import Scrubber

    pol, tpl = synth.Policy.load(Path(policy) if policy else None), synth.template(Path(template))
    src, target, cols, rows = synth.source_table(v.con, source, table)
    rows, found = synth.scrubbed(rows, Scrubber(pii, v.secrets.pseudonym_key))
    pairs, skipped = synth.from_template(rows, cols, tpl, str(template), limit, seed)
    stem = target.split("_", 1)[1] + "_qa"
    res = synth.land(v, dataset, stem, pairs, src, "tables",
                     {"table": target, "template": str(template), "limit": limit, "seed": seed,
                      "skipped_rows": skipped}, pol, pii, source_pii=found)
    return res.to_json()


def synth_documents(v, source: str, model: str, dataset: str, passages: int = 100, min_grounding: float = 0.5,
                    max_tokens: int = 48, policy: str | Path | None = None, pii: str = "redact",
                    progress=None) -> dict:
    """Question/answer pairs a local model writes about passages of `source`, kept when grounded in them."""
    from appliance.eval.run import open_backend, resolve_model
    from appliance.vault import synth

    pol = synth.Policy.load(Path(policy) if policy else None)
    src, items = synth.passages(v.con, source, passages)
    model_id, kind, path, in_lineage = resolve_model(v, model)
    backend = open_backend(kind, path)
    try:
        with v.released():  # the model works without the vault; the passages are in memory
            rows, dropped = synth.from_documents(lambda p, n: backend.complete(p, False, n)["output"], items,
                                                 min_grounding, max_tokens,
                                                 (lambda d, t: progress("passages", d, t)) if progress else
                                                 (lambda d, t: None))
    finally:
        backend.close()
    res = synth.land(v, dataset, "passages_qa", rows, src, "documents",
                     {"model": model_id, "passages": len(items), "min_grounding": min_grounding,
                      "max_tokens": max_tokens}, pol, pii, dropped=dropped,
                     extra_parents=[(model_id, "generator")] if in_lineage else [])
    return res.to_json()


def synth_edge_cases(v, source: str, dataset: str, table: str | None = None, rows: int = 100,
                     policy: str | Path | None = None, seed: int = 0, pii: str = "redact") -> dict:
    """Long-tail rows of a table (unseen and rare combinations, extremes): a new synthetic version."""
    from appliance.vault import synth
    from appliance.vault.pii import Scrubber

    pol = synth.Policy.load(Path(policy) if policy else None)
    src, target, cols, data = synth.source_table(v.con, source, table)
    data, found = synth.scrubbed(data, Scrubber(pii, v.secrets.pseudonym_key))
    made = synth.edge_cases(data, cols, rows, seed)
    res = synth.land(v, dataset, target.split("_", 1)[1] + "_edge", made, src, "edge-cases",
                     {"table": target, "rows": rows, "seed": seed}, pol, pii, source_pii=found)
    return res.to_json()


# --- train, models, lineage, audit -------------------------------------------------------------------
def train_tokenizer(v, dataset: str | list[str], vocab: int = 32000, name: str | None = None,
                    min_frequency: int = 2) -> dict:
    from appliance.train.tokenizer import train_tokenizer as train

    return train(v, dataset, vocab, name, min_frequency).to_json()


def train_run(v, recipe: str | dict, overrides: list[str] | None = None, resume: bool = False, gpus: int = 0,
              nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "", on_event=None) -> dict:
    """Train in this process (torchrun below it when `gpus` > 0); `recipe` is a name, a TOML path or its tables.

    `on_event(kind, data)` sees "start", "step", "checkpoint", "stage" and "warning" (over-fitting, once each)
    events as the CLI's progress does.
    """
    from appliance.errors import UsageError
    from appliance.train.config import build_recipe, load_recipe
    from appliance.train.launch import Nodes
    from appliance.train.run import run

    r = build_recipe(dict(recipe), overrides) if isinstance(recipe, dict) else load_recipe(recipe, overrides)
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give node 0's address and a free port")
    kw = {"on_event": on_event} if on_event else {}
    res = run(v, r, resume=resume, gpus=gpus, nodes=Nodes(nnodes, node_rank, rdzv_endpoint), **kw).to_json()
    return {**res, "notes": list(r.notes)}  # what loading adjusted (a warmup fitted to a shortened run)


def train_recipes(keys: bool = False, home: Path | None = None) -> dict:
    """The shipped recipes, or (with `keys`) every recipe key with its default and meaning. Needs no vault.

    Parameter counts use the vocabulary of the recipe's tokenizer when `home` has it, else 32,000 tokens;
    `parameters.vocab_size` and `parameters.vocab_from` (the tokenizer id, or null) say which.
    """
    from appliance.train.config import describe, load_recipe, recipe_purpose, shipped
    from appliance.train.model import count_parameters, tokenizer_vocab

    if keys:
        return {"keys": describe()}
    items = []
    for name, path in shipped().items():
        r = load_recipe(str(path))
        params = None
        if r.stage == "pretrain":
            tok, vocab = tokenizer_vocab(home, r.data.tokenizer) if home else (None, 32000)
            params = {**count_parameters(r.model, vocab), "vocab_size": vocab, "vocab_from": tok}
        items.append({"name": name, "path": str(path), "stage": r.stage, "method": r.method,
                      "arch": r.model.arch if r.stage == "pretrain" else None, "parameters": params,
                      "command": path.read_text().splitlines()[0].lstrip("# "), "purpose": recipe_purpose(path)})
    return {"recipes": items}


def train_import(v, src: str | Path, name: str) -> dict:
    from appliance.train.run import import_model

    return import_model(v, Path(src), name)


def train_merge(v, adapter: str) -> dict:
    from appliance.train.run import merge

    merged = merge(v, adapter)
    return {"id": merged, "path": str(v.home.artifacts / "models" / merged)}


def train_metrics(v, run_id: str) -> dict:
    from appliance.errors import VaultError
    from appliance.train.run import metrics

    rows = metrics(v.con, run_id)
    if not rows:
        raise VaultError(f"no metrics for run {run_id}", "list runs with `appliance train runs`")
    return {"run": run_id, "metrics": rows}


def train_plot(v, runs: list[str], out: str | Path) -> dict:
    """The training loss of runs per step, as a PNG."""
    from appliance.errors import UsageError
    from appliance.eval.plots import loss_png
    from appliance.train.run import losses

    curves = {r: losses(v.con, r) for r in runs}
    if empty := [r for r, ls in curves.items() if not ls]:
        raise UsageError(f"no training metrics for {', '.join(empty)}", "list runs with `appliance train runs`")
    loss_png(curves, Path(out))
    return {"out": str(out), "runs": list(curves)}


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


def audit_verify(v) -> dict:
    """The hash chain checked: any edited, deleted or reordered entry is listed in `problems`."""
    from appliance.vault import audit

    return audit.verify(v.con, v.secrets.audit_key).to_json()


# --- quantize and eval, in this process ---------------------------------------------------------------
def quantize(v, model: str, type: str = "q4_k_m", imatrix: str | None = None, eval: str | None = None,  # noqa: A002
             ppl_bound: float | None = None, eval_tokens: int = 2048, imatrix_tokens: int = 8192,
             threads: int = 0, progress=None) -> dict:
    """Export `model` to GGUF, quantize and measure it; `progress(stage, done, total)` sees it go."""
    from appliance.quantize.stage import quantize as run

    kw = {"progress": progress} if progress else {}
    return run(v, model, type, imatrix, eval, ppl_bound, eval_tokens, imatrix_tokens, threads, **kw).to_json()


def quantize_list(v) -> dict:
    """The GGUF files the vault knows (`appliance quantize --list`)."""
    from appliance.quantize.stage import exported

    return {"gguf": exported(v.con)}


def eval_suites() -> dict:
    """The shipped example suites. Needs no vault."""
    from appliance.eval.suite import SUITES_DIR, load

    rows = [load(str(p)) for p in sorted(SUITES_DIR.glob("*.toml"))]
    return {"suites": [{"name": s.name, "cases": len(s.cases), "metrics": [m.key for m in s.metrics],
                        "path": s.path, "description": s.description} for s in rows]}


def eval_run(v, suite: str, model: str, progress=None) -> dict:
    """Run a suite (shipped name, TOML file, or NAME@N for a dataset's default suite) on a model.

    As `eval run --json`: "ok" is the call's outcome and "checks_ok" whether the suite's thresholds held.
    """
    from appliance.eval.metrics import load_plugins
    from appliance.eval.run import run
    from appliance.eval.suite import DATASET_REF, from_dataset, load

    load_plugins()
    s = from_dataset(v.con, suite) if DATASET_REF.match(suite) else load(suite)
    res = run(v, s, model, **({"progress": progress} if progress else {}))
    return {**res, "ok": True, "checks_ok": res["ok"]}


def eval_runs(v) -> dict:
    from appliance.eval.run import runs

    return {"runs": runs(v.con)}


def eval_compare(v, a: str, b: str) -> dict:
    from appliance.eval.run import compare

    return compare(v.con, a, b)


def eval_gate(v, baseline: str, candidate: str, tolerances: dict[str, float] | None = None,
              tolerance: float = 0.0) -> dict:
    """Whether any metric of `candidate` regresses beyond tolerance against `baseline` ("ok" false if so).

    `tolerances` per metric, `tolerance` for the rest: relative, accuracy in absolute points."""
    from appliance.eval.run import gate

    return gate(v.con, baseline, candidate, tolerances or {}, tolerance)


def eval_drift(v, model: str, dataset: str | None = None, baseline: str | None = None, max_change: float = 0.2,
               max_kl: float = 0.05, probes: int = 20, rebaseline: bool = False) -> dict:
    from appliance.eval.drift import check

    return check(v, model, dataset, baseline, max_change, max_kl, probes, rebaseline)


def eval_plot(v, runs: list[str], out: str | Path) -> dict:
    """The metrics of eval runs side by side, as a PNG."""
    from appliance.eval.plots import metrics_png
    from appliance.eval.run import load_run

    keys = metrics_png([load_run(v.con, r)[0] for r in runs], Path(out))
    return {"out": str(out), "metrics": keys}


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


# --- keys, trust, bundles ----------------------------------------------------------------------------
def keys_generate(v, name: str) -> dict:
    """A signing key pair; the secret half is sealed under APPLIANCE_KEY_PASSPHRASE[_FILE]."""
    from appliance.exchange import generate_key, keys_dir

    pub = generate_key(v, name)
    return {"name": name, "key_id": pub.key_id, "public": str(keys_dir(v.home) / f"{name}.pub")}


def keys_list(v) -> dict:
    from appliance.exchange import list_keys

    return {"keys": list_keys(v.home)}


def keys_export_public(v, name: str, out: str | Path | None = None) -> dict:
    """The public key other sites trust or encrypt to; written to `out` when given."""
    import json

    from appliance.exchange import public_key
    from appliance.home import atomic_write

    _, pub = public_key(v.home, name)
    if out:
        atomic_write(Path(out), json.dumps(pub.to_json(), indent=2).encode(), mode=0o644)
    return {"name": name, "key_id": pub.key_id, "out": str(out) if out else None, "public": pub.to_json()}


def trust_add(v, pub_file: str | Path, name: str, kinds: list[str] | None = None) -> dict:
    from appliance.exchange import trust_add as add

    return add(v, Path(pub_file), name, ["model", "gguf", "dataset", "eval"] if kinds is None else kinds)


def trust_list(v) -> dict:
    from appliance.exchange import trust_list as listing

    return {"trusted": listing(v.home)}


def trust_remove(v, name: str) -> dict:
    from appliance.exchange import trust_remove as remove

    return remove(v, name)


def bundle_inspect(v, file: str | Path) -> dict:
    """The manifest, signer and lineage of a bundle, without trusting or unpacking anything."""
    from appliance.exchange import inspect

    return inspect(v.home, Path(file))


def bundle_verify(v, file: str | Path) -> dict:
    from appliance.exchange import verify_bundle

    return verify_bundle(v, Path(file))


def bundle_import(v, file: str | Path, allow_downgrade: bool = False) -> dict:
    from appliance.exchange import import_bundle

    return import_bundle(v, Path(file), allow_downgrade)


def bundle_export(v, ref: str, sign_key: str, out: str | Path, to: list[str | Path] | None = None,
                  expires_days: float = 365) -> dict:
    from appliance.exchange import export_bundle

    return export_bundle(v, ref, sign_key, [Path(p) for p in to or []], Path(out).expanduser(), expires_days)
