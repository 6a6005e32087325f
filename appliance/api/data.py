"""Data in the vault: datasets and versions, records, read-only SQL, ingest and export, checks, key changes,
synthetic versions, lineage and the audit log."""

from __future__ import annotations

from pathlib import Path


def vault_datasets(v) -> dict:
    from appliance.vault import versions

    return {"datasets": versions.datasets(v.con)}


def vault_versions(v) -> dict:
    """Every committed version of every dataset, newest first per dataset: records, bytes, PII mode, when."""
    from appliance.vault import versions

    return {"versions": versions.all_versions(v.con)}


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


def vault_ingest(v, paths: list[str | Path], dataset: str | None, pii: str | None = "redact", validation: float = 0.05,
                 replace: bool = False, workers: int | None = None, progress=None, on_plan=None,
                 follow_links: bool = False, rescrub: str | None = None) -> dict:
    """Ingest files into a new version; `progress(item)` and `on_plan(total)` see it go (as the CLI's bar).

    A partial ingest (some files unreadable) lands the rest and says so in `partial` and `failed`. Links
    below `paths` are skipped (and listed in `skipped`) unless `follow_links`, which the operator's CLI
    alone passes (never the MCP server); a link into the home is refused either way. Every field that lands
    (titles, subjects, document properties, paths, table and column names) is scrubbed like the text.

    `rescrub="NAME@N"` (no `paths`) scrubs that version again instead: `vault_rescrub`."""
    vault_ingest_check(paths, dataset, rescrub, replace, follow_links)
    if rescrub:
        return vault_rescrub(v, rescrub, pii, dataset, workers)
    from appliance.vault.ingest import ingest

    return ingest(v, [Path(p) for p in paths], dataset, pii or "redact", validation, replace, progress=progress,
                  on_plan=on_plan, workers=workers, follow_links=follow_links).to_json()


def vault_ingest_check(paths: list, dataset: str | None, rescrub: str | None = None, replace: bool = False,
                       follow_links: bool = False) -> None:
    """The arguments of `vault_ingest` checked as it checks them, so a skin refuses them before it asks for the
    passphrase: paths and a dataset, or `rescrub` without paths (nor `replace`, nor `follow_links`)."""
    from appliance.errors import UsageError
    from appliance.vault.ingest import validate_name

    if rescrub:
        if paths:
            raise UsageError("--rescrub takes no PATHS", "re-scrub a version, or ingest files, one at a time")
        if replace or follow_links:
            raise UsageError(f"--rescrub cannot be used with {'--replace' if replace else '--follow-links'}",
                             "a re-scrub reads the version, not files")
    elif not paths:
        raise UsageError("no paths to ingest", "name one or more files or directories (or --rescrub NAME@N)")
    elif not dataset:
        raise UsageError("--dataset is required", "name the dataset: --dataset NAME")
    if dataset:
        validate_name(dataset)


def vault_rescrub(v, ref: str, pii: str | None = None, dataset: str | None = None, workers: int | None = None
                  ) -> dict:
    """Scrub version `ref` again under the current (stricter) policy: a new version of `dataset` (default: the
    same dataset) whose lineage parent is `ref` and whose lineage says why (`policy_before`, `policy_after`).
    What was made from `ref` is warned about from then on (`lineage`, `vault_show`). `pii` defaults to the old
    version's mode when it was redact or pseudonymize, else redact. Returns `vault_ingest`'s shape, plus
    `rescrub_of`, `policy_before` and `policy_after`. `workers` processes scrub its records, as in an ingest."""
    from appliance.vault.rescrub import rescrub

    return rescrub(v, ref, pii, dataset, workers)


def vault_pii_review(v, ref: str, limit: int = 20, offset: int = 0, type: str | None = None,  # noqa: A002
                     band: str | None = None, file: str | None = None) -> dict:
    """The lowest-confidence PII findings of version `ref` in context, each value masked, to tune the policy.

    `type` keeps one PII type (PERSON, ...), `band` one confidence band (low, medium, high), `file` one source
    file (whole or by its last components, as it landed or as it was named on disk). `total` counts every match;
    `summary` is the version's report by type, detector and band. Values are never stored: the context is the
    scrubbed text around each finding."""
    from appliance.vault.review import review

    return review(v.con, ref, limit, offset, type, band, file, key=v.secrets.pseudonym_key)


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


def vault_seal(v) -> dict:
    """Seal the artifacts an older appliance left in the clear under artifacts/ (`vault check` lists them); each
    directory is replaced whole by its sealed copy. Audited."""
    from appliance import sealed

    done, total = [], 0
    root = v.home.artifacts
    for kind in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for d in sorted(p for p in kind.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if n := sealed.seal_plain(v.store, d):
                done.append(d.relative_to(root).as_posix())
                total += n
    with v.transaction():
        v.audit("vault.seal", [], {"artifacts": done, "bytes": total})
    return {"sealed": done, "bytes": total}


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


def lineage(v, node_id: str) -> dict:
    from appliance import refs
    from appliance.vault import lineage as lin

    node = refs.node(v.con, node_id)
    return {"lineage": lin.tree(v.con, node), "warnings": [w["message"] for w in lin.less_scrubbed(v.con, node)]}


def lineage_descendants(v, node_id: str) -> dict:
    """What was made from `node_id` (runs, models, GGUFs, evals, bundles), nested under `children`: the other
    direction of `lineage`."""
    from appliance import refs
    from appliance.vault import lineage as lin

    node = refs.node(v.con, node_id)
    return {"id": node, "made": lin.descendants(v.con, node)}


def audit_log(v, limit: int = 50, action: str | None = None) -> dict:
    from appliance.vault import audit

    return {"entries": audit.entries(v.con, limit, action)}


def audit_verify(v) -> dict:
    """The hash chain checked: any edited, deleted or reordered entry is listed in `problems`."""
    from appliance.vault import audit

    return audit.verify(v.con, v.secrets.audit_key).to_json()


# --- checks and wording a skin needs around the functions above ------------------------------------------
def validate_dataset_name(name: str, what: str = "dataset") -> str:
    """`name` when it will do for an id NAME@N (a dataset, tokenizer, ...); a UsageError saying the rule
    otherwise (so a skin refuses a bad name before it asks for the passphrase)."""
    from appliance.vault.ingest import validate_name

    return validate_name(name, what)


def record_origin(record: dict) -> str:
    """Where a record (as `vault_records` or `vault_record` return it) came from: its source file, and the
    path inside it (a repository file, a mail member)."""
    from appliance.vault.versions import origin

    return origin(record)


def lineage_lines(tree: dict) -> list[str]:
    """A lineage tree (`lineage(v, id)["lineage"]`) as indented lines of text, as `appliance lineage` prints it."""
    from appliance.vault import lineage as lin

    return lin.render(tree)


def synth_check(template: str | Path | None = None, policy: str | Path | None = None) -> None:
    """Read the policy and template files as `synth_*` would, raising what they would: a bad file is
    refused before a vault is opened."""
    from appliance.vault import synth

    synth.Policy.load(Path(policy) if policy else None)
    if template is not None:
        synth.template(Path(template))
