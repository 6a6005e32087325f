"""`appliance init`, `vault ...` (backup and restore too), `lineage`, `audit ...`: thin over `appliance.api`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance import api
from appliance.api.format import human_bytes
from appliance.cli.app import Ctx, cli, command, with_error
from appliance.cli.output import ProgressBar, err, out, table
from appliance.errors import CheckFailed, PartialIngest, VaultError


# --- init ----------------------------------------------------------------------------------------
@command(cli, "init")
@click.option("--kdf-memory", type=click.IntRange(64, 4096), default=64, show_default=True,
              help="Argon2id memory in MiB.")
@click.option("--kdf-iterations", type=click.IntRange(3, 100), default=3, show_default=True)
def init_cmd(c: Ctx, kdf_memory, kdf_iterations):
    """Create a new encrypted vault in the home directory."""
    home = c.home
    if home.exists():
        raise VaultError(f"a vault already exists at {home.root}", "use it, or pick another --home")
    passphrase = api.check_new_passphrase(api.get_passphrase(confirm=True))
    data = api.init(home, passphrase, kdf_memory, kdf_iterations)
    c.emit(data, f"created vault {data['vault_id']} at {home.root}\n"
                 "keep the passphrase safe: without it the vault cannot be opened")


# --- vault ---------------------------------------------------------------------------------------
@cli.group("vault")
def vault_group():
    """Ingest, list, inspect, query, export and maintain the encrypted vault."""


@command(vault_group, "ingest")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--dataset", "-d", default=None, help="Dataset name; a new version NAME@N is created.")
@click.option("--pii", type=click.Choice(["redact", "pseudonymize", "flag", "off"]), default=None,
              help="What to do with personal data found.  [default: redact; with --rescrub, the old version's "
                   "mode if it replaced what it found]")
@click.option("--validation", type=float, default=0.05, show_default=True,
              help="Fraction of records held out as the validation split.")
@click.option("--replace", is_flag=True, help="Start the version from nothing instead of the previous one.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes that read and scrub files (default: one per core, at most 8).")
@click.option("--follow-links", is_flag=True,
              help="Follow symbolic links below PATHS (default: report them as skipped); never into the home.")
@click.option("--rescrub", "rescrub", default=None, metavar="NAME@N",
              help="Scrub version NAME@N again under the current policy (no PATHS): a new version of its dataset "
                   "(or --dataset), its lineage parent NAME@N; what was made from NAME@N is warned about.")
def ingest_cmd(c: Ctx, paths, dataset, pii, validation, replace, workers, follow_links, rescrub):
    """Ingest files, mail, code repositories and tables into a new dataset version."""
    if not rescrub and (not paths or not dataset):  # as click says it when an argument is required
        ctx = click.get_current_context()
        missing = next(p for p in ctx.command.params if p.name == ("dataset" if paths else "paths"))
        raise click.MissingParameter(ctx=ctx, param=missing, param_hint=None if paths else "'PATHS...'")
    api.vault_ingest_check(list(paths), dataset, rescrub, replace, follow_links)
    bar = ProgressBar(not c.json and not rescrub, f"ingest {dataset or rescrub}")
    with c.open_vault() as v:
        on_plan, on_item = bar.callbacks()
        try:
            res = api.vault_ingest(v, list(paths), dataset, pii, validation, replace, workers, on_item, on_plan,
                                   follow_links, rescrub)
        finally:
            bar.stop()

    def human():
        _print_ingest(res, pii or "redact")
        if rescrub:
            out.print(f"re-scrubbed {res['rescrub_of']} (pii {res['policy_before'].get('mode')}) as "
                      f"{res['version']} (pii {res['policy_after']['mode']}); what was made from "
                      f"{res['rescrub_of']} is marked in lineage as made from less-scrubbed data", markup=False)

    c.emit(res, human)
    if res["partial"]:
        raise PartialIngest(f"partial: {len(res['failed'])} file(s) could not be read; {res['version']} has the "
                            "rest", f"see `appliance vault show {res['version']}`")


def _print_ingest(res: dict, pii: str) -> None:
    out.print(f"{res['version']}  {res['records']} records ({res['new_records']} new), "
              f"{human_bytes(res['bytes'])}, {res['duplicates']} duplicates removed, {res['files']} files")
    if res["pii"]:
        out.print("PII " + ("flagged" if pii == "flag" else "found") + ": " +
                  ", ".join(f"{k} {n}" for k, n in res["pii"].items()))
    for t in res["tables"]:
        out.print(f"table {t}")
    for x in res["skipped"]:
        out.print(f"skipped {x['path']}: {x['reason']}", markup=False)
    for x in res["failed"]:
        err.print(f"failed {x['path']}: {x['reason']}", markup=False)


@command(vault_group, "datasets")
def datasets_cmd(c: Ctx):
    """List datasets and their newest versions."""
    with c.open_vault(read_only=True) as v:
        ds = api.vault_datasets(v)["datasets"]
    c.emit({"datasets": ds}, lambda: table(
        ["dataset", "latest", "versions", "records", "size", "content hash"],
        [[d["name"], d["latest"], d["versions"], d["records"], human_bytes(d["bytes"]), d["content_hash"][:16]]
         for d in ds]) if ds else out.print("no datasets yet: `appliance vault ingest PATH --dataset NAME`"))


@command(vault_group, "show")
@click.argument("ref")
def show_cmd(c: Ctx, ref):
    """Show one version (NAME@N, or NAME for the newest): counts, splits, sources, PII report."""
    with c.open_vault(read_only=True) as v:
        info = api.vault_show(v, ref)

    def human():
        out.print(f"[bold]{info['version']}[/]  {info['records']} records, {human_bytes(info['bytes'])}, "
                  f"content {info['content_hash']}")
        out.print(f"parents: {', '.join(info['parents']) or '-'}   pii: {info['pii_mode']}   "
                  f"splits: train {info['splits']['train']}, validation {info['splits']['validation']}   "
                  f"duplicates removed: {info['duplicates']}")
        out.print("kinds: " + ", ".join(f"{k} {n}" for k, n in info["kinds"].items()))
        if info["pii"]["total"]:
            out.print("PII: " + ", ".join(f"{k} {n}" for k, n in info["pii"]["total"].items()))
            table(["file", "PII found"], [[path, ", ".join(f"{k} {n}" for k, n in counts.items())]
                                          for path, counts in info["pii"]["per_file"].items()])
            _print_detectors(info["pii"]["by_detector"])
            out.print(f"lowest-confidence findings in context: `appliance vault pii-review {info['version']}`",
                      markup=False)
        for t in info["tables"]:
            out.print(f"table {t['table']}: {t['rows']} rows, {len(t['columns'])} columns")
        table(["source", "kind", "status", "records", "dups", "note"],
              [[s["path"], s["kind"], s["status"], s["records"], s["duplicates"], s["reason"] or ""]
               for s in info["sources"]])
        for w in info["warnings"]:
            err.print(f"warning: {w}", markup=False)

    c.emit(info, human)


def _print_detectors(rows: list[dict]) -> None:
    """The PII report by type, detector and confidence band, over all files."""
    totals: dict[tuple, int] = {}
    for r in rows:
        key = (r["type"], r["detector"] or "-", r["band"] or "-")
        totals[key] = totals.get(key, 0) + r["count"]
    if any(k[1] != "-" or k[2] != "-" for k in totals):
        table(["type", "detector", "confidence", "found"], [[*k, n] for k, n in sorted(totals.items())])


@command(vault_group, "pii-review")
@click.argument("ref")
@click.option("--type", "type_", default=None, help="Only findings of this PII type (PERSON, SSN, ...).")
@click.option("--band", type=click.Choice(["low", "medium", "high"]), default=None,
              help="Only findings in this confidence band.")
@click.option("--file", "file", default=None, help="Only findings from this source file (its full path, or its "
                                                   "last components).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
def pii_review_cmd(c: Ctx, ref, type_, band, file, limit, offset):
    """Show a version's lowest-confidence PII findings in context, each value masked, to tune the policy."""
    with c.open_vault(read_only=True) as v:
        res = api.vault_pii_review(v, ref, limit, offset, type_, band, file)

    def human():
        from rich.markup import escape  # record text may hold [tags] of its own

        if not res["findings"]:
            out.print(f"no PII findings of {res['version']} " + ("match" if type_ or band or file else "to review"),
                      markup=False)
            return
        table(["score", "type", "detector", "record", "field", "context"],
              [[f"{f['score']:.2f} {f['band']}", f["type"], f["detector"] or "-", f["id"] or f["source"], f["field"],
                escape(f["context"])] for f in res["findings"]])
        shown = f"{offset + 1}-{offset + len(res['findings'])}"
        err.print(f"findings {shown} of {res['total']} kept for review, lowest score first"
                  + (f"; next: --offset {offset + len(res['findings'])}"
                     if offset + len(res["findings"]) < res["total"] else ""), markup=False)

    c.emit(res, human)


@command(vault_group, "records")
@click.argument("ref")
@click.option("--grep", default=None, help="Only records whose text contains TEXT (case-insensitive).")
@click.option("--file", "file", default=None, help="Only records from this source file (its full path, or its "
                                                   "last components: handbook/permits.md).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
def records_cmd(c: Ctx, ref, grep, file, limit, offset):
    """List a version's records (NAME@N): id, kind, split, source, size; `vault record ID` prints one."""
    with c.open_vault(read_only=True) as v:
        res = api.vault_records(v, ref, offset, limit, text=False, grep=grep, file=file)
    rows = res["records"]

    def human():
        if not rows:
            out.print(f"no records of {res['version']} match" if grep or file else f"{res['version']} has no records"
                      + (f" past {offset}" if offset else ""))
            return
        table(["id", "kind", "split", "source", "title", "bytes"],
              [[r["id"], r["kind"], r["split"], api.record_origin(r), r["title"] or "", r["bytes"]] for r in rows])
        shown = f"{offset + 1}-{offset + len(rows)}"
        err.print(f"records {shown} of {res['total']}" + (f"; next: --offset {offset + len(rows)}"
                                                           if offset + len(rows) < res["total"] else "")
                  + "; read one with `appliance vault record ID`", markup=False)

    c.emit(res, human)


@command(vault_group, "record")
@click.argument("record_id")
def record_cmd(c: Ctx, record_id):
    """Print one record (NAME@N#ORD, as `vault records` lists it): its source, kind, split and text."""
    with c.open_vault(read_only=True) as v:
        rec = api.vault_record(v, record_id)

    def human():
        out.print(f"{rec['id']}  {rec['kind']}  split {rec['split']}" + (f"  title {rec['title']}" if rec["title"]
                                                                         else ""), markup=False)
        out.print(f"source: {api.record_origin(rec) or '-'}", markup=False)
        out.print("")
        out.print(rec["text"], markup=False)

    c.emit(rec, human)


@command(vault_group, "sql")
@click.argument("query")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="How rows are printed: a table that fits the terminal (wide cells cut), CSV, or a JSON array "
                   "of objects (--json prints the command's JSON object instead).")
def sql_cmd(c: Ctx, query, limit, fmt):
    """Run read-only SQL over the vault (tables: versions, version_records, blobs, data.*, audit, ...).

    To read records without SQL: `appliance vault records NAME@N` and `appliance vault record NAME@N#ORD`.
    """
    with c.open_vault() as v:
        res = api.vault_sql(v, query, limit)
    c.emit(res, lambda: (_print_rows(res["columns"], res["rows"], fmt),
                         res["truncated"] and err.print(f"(first {limit} rows; use --limit)")))


def _print_rows(columns: list[str], rows: list[list], fmt: str) -> None:
    """Query results as a table that fits the terminal (wide cells cut, marked `…`), CSV or JSON objects."""
    import csv
    import json as _json

    if fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if x is None else x if isinstance(x, str) else _json.dumps(x) if isinstance(x, list | dict)
                      else x for x in r] for r in rows])
        return
    if fmt == "json":
        sys.stdout.write(_json.dumps([dict(zip(columns, r)) for r in rows], ensure_ascii=False, default=str) + "\n")
        return
    from rich.markup import escape

    width = max(10, (out.width - 1 - 3 * max(1, len(columns))) // max(1, len(columns)))  # borders and padding

    def cell(x) -> str:
        s = " ".join(("" if x is None else str(x)).split())  # one line per row
        return escape(s if len(s) <= width else s[:width - 1] + "…")

    table([escape(str(c)) for c in columns], [[cell(x) for x in r] for r in rows])


@command(vault_group, "export")
@click.argument("ref")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="JSONL file to write.")
@click.option("--split", type=click.Choice(["train", "validation"]), default=None)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def export_cmd(c: Ctx, ref, out_path, split, force):
    """Export a version as plaintext JSONL. Explicit and audited: the data leaves the vault."""
    with c.open_vault() as v:
        res = api.vault_export(v, ref, out_path, split, force)
    c.emit(res, lambda: (out.print(f"exported {res['records']} records of {res['version']} to {res['out']}"),
                         err.print("warning: this file is plaintext outside the vault")))


@command(vault_group, "check")
def check_cmd(c: Ctx):
    """Verify every record against its hash, every version against its records, and the audit chain."""
    with c.open_vault() as v:
        rep = api.vault_check(v)
    failure = CheckFailed(f"vault check found {len(rep['problems'])} problem(s)", "restore from a backup")
    c.emit(with_error(rep, None if rep["ok"] else failure), lambda: out.print(
        f"{'ok' if rep['ok'] else 'FAILED'}: {rep['records']} records, {rep['versions']} versions, "
        f"{rep['audit_entries']} audit entries, {rep['artifacts']} sealed artifacts checked" +
        "".join(f"\n  {p}" for p in rep["problems"]) +
        "".join(f"\n  in the clear: {u} (seal with `appliance vault seal`)" for u in rep["unsealed"]) +
        "".join(f"\n  no manifest: {u} (made before manifests; its set of files is not checked)"
                for u in rep.get("unmanifested", []))))
    if not rep["ok"]:
        raise failure


@command(vault_group, "seal")
def seal_cmd(c: Ctx):
    """Seal the artifacts an older appliance left in the clear (models, tokenizers, GGUFs, runs)."""
    with c.open_vault() as v:
        res = api.vault_seal(v)
    c.emit(res, f"sealed {len(res['sealed'])} artifact(s)" + "".join(f"\n  {a}" for a in res["sealed"]))


@command(vault_group, "passwd")
@click.option("--rekey", is_flag=True,
              help="Also rotate the data key, under the new passphrase (for a suspected compromise).")
def passwd_cmd(c: Ctx, rekey):
    """Change the passphrase. The data key stays: the keys are re-wrapped, no data is re-encrypted.

    Someone who had the old passphrase and a copy of keyring.json (or a backup) still has the data key.
    For a suspected compromise use --rekey: new passphrase and a new data key (`vault rekey`), each checked.
    The new passphrase comes from APPLIANCE_NEW_PASSPHRASE_FILE, APPLIANCE_NEW_PASSPHRASE or a prompt.
    """
    passphrase = api.get_passphrase()  # checked again against the keyring before the keys are re-wrapped
    with c.open_vault(passphrase=passphrase) as v:
        new = api.check_new_passphrase(api.get_passphrase(confirm=True, prefix="APPLIANCE_NEW_PASSPHRASE",
                                                          label="new passphrase"))
        res = api.vault_passwd(v, passphrase, new, rekey=rekey)
    c.emit(res, "passphrase changed" + ("; data key rotated, the old database file was overwritten and removed"
                                        if rekey else "; the data key is unchanged (--rekey rotates it)"))


@command(vault_group, "rekey")
def rekey_cmd(c: Ctx):
    """Rotate the data key: copy into a new encrypted database, swap atomically, destroy the old file."""
    passphrase = api.get_passphrase()  # rekey wraps the new key under it, so it is needed twice
    with c.open_vault(passphrase=passphrase) as v:
        res = api.vault_rekey(v, passphrase)
    c.emit(res, "data key rotated; the old database file was overwritten and removed")



# --- lineage and audit ---------------------------------------------------------------------------
@command(cli, "lineage")
@click.argument("node_id")
def lineage_cmd(c: Ctx, node_id):
    """Print what NODE_ID (a dataset version, model, ...) came from, as a tree."""
    with c.open_vault(read_only=True) as v:
        res = api.lineage(v, node_id)
    t = res["lineage"]
    c.emit(res, lambda: (out.print("\n".join(api.lineage_lines(t))),
                         [err.print(f"warning: {w}", markup=False) for w in res["warnings"]]))


@cli.group("audit")
def audit_group():
    """The tamper-evident audit log."""


@command(audit_group, "verify")
def audit_verify_cmd(c: Ctx):
    """Check the hash chain: any edited, deleted or reordered entry is reported."""
    with c.open_vault(read_only=True) as v:
        rep = api.audit_verify(v)
    failure = CheckFailed(f"audit log verification failed ({len(rep['problems'])} problem(s))",
                          "the log was altered outside the appliance")
    c.emit(with_error(rep, None if rep["ok"] else failure), lambda: out.print(
        f"{'ok' if rep['ok'] else 'FAILED'}: {rep['entries']} entries" + "".join(f"\n  {p}" for p in rep["problems"])))
    if not rep["ok"]:
        raise failure


@command(audit_group, "log")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--action", default=None, help="Filter by action, e.g. 'vault.*'.")
def audit_log_cmd(c: Ctx, limit, action):
    """Show the newest audit entries."""
    with c.open_vault(read_only=True) as v:
        rows = api.audit_log(v, limit, action)["entries"]
    c.emit({"entries": rows}, lambda: table(
        ["seq", "time", "actor", "action", "ids", "details"],
        [[r["seq"], r["ts"][:19], r["actor"], r["action"], ",".join(r["ids"]),
          ", ".join(f"{k}={val}" for k, val in r["details"].items())] for r in rows]))


@command(vault_group, "backup")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="Backup file to write.")
@click.option("--no-checkpoints", is_flag=True, help="Leave out training checkpoints (models are kept).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def backup_cmd(c: Ctx, out_path, no_checkpoints, force):
    """Write an encrypted, verifiable snapshot of the home: vault, wrapped keys, models and the rest."""
    with c.open_vault() as v:
        r = api.vault_backup(v, out_path, no_checkpoints=no_checkpoints, force=force)
    c.emit(r, f"{r['out']}: {r['files']} files, {r['bytes'] / 2**20:.1f} MiB of the home in "
              f"{r['size'] / 2**20:.1f} MiB, encrypted under the vault's key (restore needs the passphrase)")


@command(vault_group, "restore")
@click.argument("backup_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace a non-empty home (it is kept beside the new one, renamed).")
def restore_cmd(c: Ctx, backup_file, force):
    """Bring a backup back as --home: every file's hash and the vault's records and audit chain are checked
    before it takes the home's name."""
    r = api.vault_restore(backup_file, c.home.root, api.get_passphrase(), force=force)
    c.emit(r, f"restored vault {r['vault_id']} (backed up {r['created']}) to {r['home']}: {r['files']} files, "
              f"{r['records']} records and {r['versions']} versions checked, audit chain of {r['audit_entries']} "
              "entries intact" + (f"; the old home is at {r['replaced']}" if r["replaced"] else ""))
