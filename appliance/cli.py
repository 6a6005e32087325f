"""The `appliance` command: one table of commands, thin over the library.

Contract: global `--home DIR` and `--json` (also accepted after any subcommand); passphrase from
APPLIANCE_PASSPHRASE_FILE, APPLIANCE_PASSPHRASE or a terminal prompt. Exit codes: 0 ok, 1 error,
2 usage error, 3 partial (an ingest that landed but skipped unreadable files), 130 interrupted.
Errors are one line on stderr (and `{"ok": false, ...}` on stdout with --json); never a traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from appliance import __version__
from appliance.errors import ApplianceError, CheckFailed, PartialIngest, UsageError, VaultError, one_line
from appliance.hardening import protect_process
from appliance.home import Home, default_home
from appliance.output import ProgressBar, emit_json, err, human_bytes, num, out, table
from appliance.passphrase import check_new, get_passphrase
from bundles.errors import BundleError


@dataclass
class Ctx:
    home_arg: Path | None = None
    json: bool = False
    verbose: bool = False

    @property
    def home(self) -> Home:
        return Home((self.home_arg or default_home()).expanduser().absolute())

    def open_vault(self, read_only: bool = False, passphrase: str | None = None):
        from appliance.vault import Vault  # duckdb import: ~0.3 s, only for commands that need it

        home = self.home
        if not home.exists():
            raise VaultError(f"no vault at {home.root}", "run `appliance init` or pass --home")
        return Vault.open(home, passphrase or get_passphrase(), read_only=read_only)

    def emit(self, data: dict, human=None) -> None:
        if self.json:
            emit_json(dict(data))
        elif callable(human):
            human()
        elif human is not None:
            out.print(human)


def _merge_globals(f):
    """Accept --home, --json and --verbose after the subcommand too: `appliance vault datasets --json`."""
    f = click.option("--json", "json_", is_flag=True, hidden=True, help="Machine-readable output.")(f)
    f = click.option("--home", "home_", type=click.Path(path_type=Path), hidden=True)(f)
    f = click.option("--verbose", "verbose_", is_flag=True, hidden=True)(f)

    @click.pass_context
    def wrapper(ctx, *args, json_=False, home_=None, verbose_=False, **kwargs):
        import time

        from appliance import logs

        c = ctx.find_object(Ctx)
        if home_ is not None:
            c.home_arg = home_
        if json_:
            c.json = True
        c.verbose = c.verbose or verbose_
        name = ctx.command_path.split(" ", 1)[1] if " " in ctx.command_path else ctx.command_path
        logs.setup(c.home.logs, c.verbose)
        # option names only, never their values (a value can be a query, a path or a passphrase)
        given = sorted(k for k, v in kwargs.items() if v not in (None, False, (), []))
        logs.debug("command.start", command=name, options=given, home=str(c.home.root))
        t0 = time.perf_counter()
        try:
            result = ctx.invoke(f, c, *args, **kwargs)
        except BaseException as e:
            code = getattr(e, "exit_code", None)
            if isinstance(e, SystemExit):
                code = e.code if isinstance(e.code, int) else 0
            elif code is None:
                code = 130 if isinstance(e, KeyboardInterrupt) else 1
            logs.setup(c.home.logs, c.verbose)  # `init` and `demo` make the logs directory as they run
            # the error's kind, not its message: a database error can quote a value from the vault
            logs.event("command.end", logging_level(code), command=name, exit_code=code,
                       seconds=round(time.perf_counter() - t0, 3), error=type(e).__name__)
            raise
        logs.setup(c.home.logs, c.verbose)
        logs.event("command.end", command=name, exit_code=0, seconds=round(time.perf_counter() - t0, 3))
        return result

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    wrapper.__click_params__ = f.__click_params__  # type: ignore[attr-defined]
    return wrapper


def logging_level(code: int) -> int:
    import logging

    return logging.INFO if code == 0 else logging.WARNING if code in (2, 3, 130) else logging.ERROR


def refuse_repeats(cmd: click.Command, ctx: click.Context, args: list[str]) -> None:
    """Refuse an option given twice that takes one value: click would silently keep the last one.

    Options declared `multiple=True` (and flags) may repeat; for a group, only its own options (before the
    subcommand) are looked at. Unknown `--KEY VALUE` pairs (`train run` overrides) are checked by the recipe.
    """
    opts = {o: p for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    seen: set[str] = set()
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg == "--" or (isinstance(cmd, click.Group) and not arg.startswith("-")):
            return
        if not arg.startswith("-") or arg == "-":
            continue
        long = arg.startswith("--")
        flag, inline = (arg.split("=", 1)[0], "=" in arg) if long else (arg[:2], len(arg) > 2)
        p = opts.get(flag)
        if p is None:
            i += 0 if inline or not cmd.ignore_unknown_options else 1
            continue
        if p.is_flag or p.count:
            continue
        i += 0 if inline else p.nargs
        if p.multiple:
            continue
        if p.name in seen:
            several = " (several values go in one comma-separated list)" if "," in (p.metavar or "") else ""
            raise click.UsageError(f"{p.opts[-1]} was given more than once but takes one value{several}; "
                                   "give it once", ctx)
        seen.add(p.name or flag)


class OnceCommand(click.Command):
    def parse_args(self, ctx, args):
        refuse_repeats(self, ctx, args)
        return super().parse_args(ctx, args)


class OnceGroup(click.Group):
    command_class = OnceCommand
    group_class = type  # subgroups are OnceGroups too

    def parse_args(self, ctx, args):
        refuse_repeats(self, ctx, args)
        return super().parse_args(ctx, args)


def command(group, name: str | None = None, **kw):
    def deco(f):
        return group.command(name, cls=OnceCommand, **kw)(_merge_globals(f))
    return deco


@click.group(cls=OnceGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="Appliance home (default: $APPLIANCE_HOME, else ~/.local/share/appliance).")
@click.option("--json", "json_", is_flag=True, help="Print one JSON object (for scripts and agents).")
@click.option("--verbose", "-v", is_flag=True, help="Show what the appliance does (its log events) on stderr.")
@click.version_option(__version__, prog_name="appliance")
@click.pass_context
def cli(ctx, home, json_, verbose):
    """Offline appliance: keep private data in an encrypted vault; train, evaluate and ship models."""
    ctx.obj = Ctx(home, json_, verbose)


# --- init ----------------------------------------------------------------------------------------
@command(cli, "init")
@click.option("--kdf-memory", type=click.IntRange(64, 4096), default=64, show_default=True,
              help="Argon2id memory in MiB.")
@click.option("--kdf-iterations", type=click.IntRange(3, 100), default=3, show_default=True)
def init_cmd(c: Ctx, kdf_memory, kdf_iterations):
    """Create a new encrypted vault in the home directory."""
    from appliance.vault import Vault

    home = c.home
    if home.exists():
        raise VaultError(f"a vault already exists at {home.root}", "use it, or pick another --home")
    passphrase = check_new(get_passphrase(confirm=True))
    kdf = {"name": "argon2id", "memory_kib": kdf_memory * 1024, "iterations": kdf_iterations, "lanes": 4}
    with Vault.init(home, passphrase, kdf) as v:
        data = {"home": str(home.root), "vault_id": v.keyring.vault_id,
                "kdf": {k: val for k, val in v.keyring.kdf.items() if k != "salt"}}
    c.emit(data, f"created vault {data['vault_id']} at {home.root}\n"
                 "keep the passphrase safe: without it the vault cannot be opened")


# --- vault ---------------------------------------------------------------------------------------
@cli.group("vault")
def vault_group():
    """Ingest, list, inspect, query, export and maintain the encrypted vault."""


@command(vault_group, "ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dataset", "-d", required=True, help="Dataset name; a new version NAME@N is created.")
@click.option("--pii", type=click.Choice(["redact", "pseudonymize", "flag", "off"]), default="redact",
              show_default=True, help="What to do with personal data found.")
@click.option("--validation", type=float, default=0.05, show_default=True,
              help="Fraction of records held out as the validation split.")
@click.option("--replace", is_flag=True, help="Start the version from nothing instead of the previous one.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes that read and scrub files (default: one per core, at most 8).")
@click.option("--follow-links", is_flag=True,
              help="Follow symbolic links below PATHS (default: report them as skipped); never into the home.")
def ingest_cmd(c: Ctx, paths, dataset, pii, validation, replace, workers, follow_links):
    """Ingest files, mail, code repositories and tables into a new dataset version."""
    from appliance import api
    from appliance.vault.ingest import validate_name

    validate_name(dataset)
    bar = ProgressBar(not c.json, f"ingest {dataset}")
    with c.open_vault() as v:
        on_plan, on_item = bar.callbacks()
        try:
            res = api.vault_ingest(v, list(paths), dataset, pii, validation, replace, workers, on_item, on_plan,
                                   follow_links)
        finally:
            bar.stop()

    def human():
        out.print(f"{res['version']}  {res['records']} records ({res['new_records']} new), "
                  f"{human_bytes(res['bytes'])}, {res['duplicates']} duplicates removed, {res['files']} files")
        if res["pii"]:
            out.print("PII " + ("flagged" if pii == "flag" else "found") + ": " +
                      ", ".join(f"{k} {n}" for k, n in res["pii"].items()))
        for t in res["tables"]:
            out.print(f"table {t}")
        for x in res["skipped"]:
            out.print(f"skipped {x['path']}: {x['reason']}")
        for x in res["failed"]:
            err.print(f"failed {x['path']}: {x['reason']}")

    c.emit(res, human)
    if res["partial"]:
        raise PartialIngest(f"partial: {len(res['failed'])} file(s) could not be read; {res['version']} has the "
                            "rest", f"see `appliance vault show {res['version']}`")


@command(vault_group, "datasets")
def datasets_cmd(c: Ctx):
    """List datasets and their newest versions."""
    from appliance import api

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
    from appliance import api

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
        for t in info["tables"]:
            out.print(f"table {t['table']}: {t['rows']} rows, {len(t['columns'])} columns")
        table(["source", "kind", "status", "records", "dups", "note"],
              [[s["path"], s["kind"], s["status"], s["records"], s["duplicates"], s["reason"] or ""]
               for s in info["sources"]])

    c.emit(info, human)


@command(vault_group, "records")
@click.argument("ref")
@click.option("--grep", default=None, help="Only records whose text contains TEXT (case-insensitive).")
@click.option("--file", "file", default=None, help="Only records from this source file (its full path, or its "
                                                   "last components: handbook/permits.md).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
def records_cmd(c: Ctx, ref, grep, file, limit, offset):
    """List a version's records (NAME@N): id, kind, split, source, size; `vault record ID` prints one."""
    from appliance import api
    from appliance.vault.versions import origin

    with c.open_vault(read_only=True) as v:
        res = api.vault_records(v, ref, offset, limit, text=False, grep=grep, file=file)
    rows = res["records"]

    def human():
        if not rows:
            out.print(f"no records of {res['version']} match" if grep or file else f"{res['version']} has no records"
                      + (f" past {offset}" if offset else ""))
            return
        table(["id", "kind", "split", "source", "title", "bytes"],
              [[r["id"], r["kind"], r["split"], origin(r), r["title"] or "", r["bytes"]] for r in rows])
        shown = f"{offset + 1}-{offset + len(rows)}"
        err.print(f"records {shown} of {res['total']}" + (f"; next: --offset {offset + len(rows)}"
                                                           if offset + len(rows) < res["total"] else "")
                  + "; read one with `appliance vault record ID`", markup=False)

    c.emit(res, human)


@command(vault_group, "record")
@click.argument("record_id")
def record_cmd(c: Ctx, record_id):
    """Print one record (NAME@N#ORD, as `vault records` lists it): its source, kind, split and text."""
    from appliance import api
    from appliance.vault.versions import origin

    with c.open_vault(read_only=True) as v:
        rec = api.vault_record(v, record_id)

    def human():
        out.print(f"{rec['id']}  {rec['kind']}  split {rec['split']}" + (f"  title {rec['title']}" if rec["title"]
                                                                         else ""), markup=False)
        out.print(f"source: {origin(rec) or '-'}", markup=False)
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
    from appliance import api

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
    from appliance import api

    with c.open_vault() as v:
        res = api.vault_export(v, ref, out_path, split, force)
    c.emit(res, lambda: (out.print(f"exported {res['records']} records of {res['version']} to {res['out']}"),
                         err.print("warning: this file is plaintext outside the vault")))


@command(vault_group, "check")
def check_cmd(c: Ctx):
    """Verify every record against its hash, every version against its records, and the audit chain."""
    from appliance import api

    with c.open_vault() as v:
        rep = api.vault_check(v)
    failure = CheckFailed(f"vault check found {len(rep['problems'])} problem(s)", "restore from a backup")
    c.emit(_with_error(rep, None if rep["ok"] else failure), lambda: out.print(
        f"{'ok' if rep['ok'] else 'FAILED'}: {rep['records']} records, {rep['versions']} versions, "
        f"{rep['audit_entries']} audit entries checked" +
        "".join(f"\n  {p}" for p in rep["problems"])))
    if not rep["ok"]:
        raise failure


@command(vault_group, "passwd")
@click.option("--rekey", is_flag=True,
              help="Also rotate the data key, under the new passphrase (for a suspected compromise).")
def passwd_cmd(c: Ctx, rekey):
    """Change the passphrase. The data key stays: the keys are re-wrapped, no data is re-encrypted.

    Someone who had the old passphrase and a copy of keyring.json (or a backup) still has the data key.
    For a suspected compromise use --rekey: new passphrase and a new data key (`vault rekey`), each checked.
    The new passphrase comes from APPLIANCE_NEW_PASSPHRASE_FILE, APPLIANCE_NEW_PASSPHRASE or a prompt.
    """
    from appliance import api

    passphrase = get_passphrase()  # checked again against the keyring before the keys are re-wrapped
    with c.open_vault(passphrase=passphrase) as v:
        new = check_new(get_passphrase(confirm=True, prefix="APPLIANCE_NEW_PASSPHRASE", label="new passphrase"))
        res = api.vault_passwd(v, passphrase, new, rekey=rekey)
    c.emit(res, "passphrase changed" + ("; data key rotated, the old database file was overwritten and removed"
                                        if rekey else "; the data key is unchanged (--rekey rotates it)"))


@command(vault_group, "rekey")
def rekey_cmd(c: Ctx):
    """Rotate the data key: copy into a new encrypted database, swap atomically, destroy the old file."""
    from appliance import api

    passphrase = get_passphrase()  # rekey wraps the new key under it, so it is needed twice
    with c.open_vault(passphrase=passphrase) as v:
        res = api.vault_rekey(v, passphrase)
    c.emit(res, "data key rotated; the old database file was overwritten and removed")


# --- train ---------------------------------------------------------------------------------------
@cli.group("train")
def train_group():
    """Train tokenizers and models on vault data: pretrain, continue, SFT (full, LoRA, QLoRA)."""


@command(train_group, "tokenizer")
@click.option("--dataset", "-d", "datasets", required=True, multiple=True,
              help="Dataset version to train on (NAME@N or NAME); repeat it to train on several.")
@click.option("--vocab", type=int, default=32000, show_default=True, help="Vocabulary size.")
@click.option("--name", default=None, help="Tokenizer name (default: DATASET-bpe); saved as NAME@K.")
@click.option("--min-frequency", type=click.IntRange(1, 1000), default=2, show_default=True)
def train_tokenizer_cmd(c: Ctx, datasets, vocab, name, min_frequency):
    """Train a byte-level BPE tokenizer on the train split of one or more dataset versions."""
    from appliance import api

    with c.open_vault() as v:
        res = api.train_tokenizer(v, list(datasets), vocab, name, min_frequency)
    c.emit(res, f"{res['id']}: {res['vocab_size']} tokens from {res['records']} records of "
                f"{', '.join(res['datasets'])}\n"
                f"saved to {res['path']}")


def _overrides(sets: tuple[str, ...], extra: list[str]) -> list[str]:
    """`--set k=v` and bare `--section.key value` / `--section.key=value` flags, in order given."""
    from appliance.errors import UsageError

    items = list(sets)
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UsageError(f"unexpected argument {arg!r}", "recipe values are given as --KEY VALUE, e.g. "
                                                             "--train.lr 1e-4")
        if "=" in arg:
            items.append(arg[2:])
            i += 1
        elif i + 1 < len(extra):
            items.append(f"{arg[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise UsageError(f"{arg} needs a value", f"write {arg} VALUE")
    return items


@command(train_group, "run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("recipe")
@click.option("--resume", is_flag=True, help="Continue the newest unfinished run of this recipe's name "
                                             "from its last checkpoint.")
@click.option("--gpus", type=click.IntRange(0, 64), default=0,
              help="Processes on this node (torchrun; DDP or FSDP2). Without GPUs: CPU processes with gloo.")
@click.option("--nnodes", type=click.IntRange(1, 1024), default=1, help="Nodes in a multi-node run.")
@click.option("--node-rank", type=click.IntRange(0, 1023), default=0, help="This node's rank (multi-node).")
@click.option("--rdzv-endpoint", default="", help="HOST:PORT of node 0 for torchrun's rendezvous (multi-node).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable); "
                                                                       "also --KEY VALUE, e.g. --train.lr 1e-4.")
@click.pass_context
def train_run_cmd(ctx, c: Ctx, recipe, resume, gpus, nnodes, node_rank, rdzv_endpoint, sets):
    """Train as RECIPE says (a shipped recipe name or a TOML file): pretrain, continue or sft.

    Every recipe value can be overridden: `appliance train run tiny-dense --train.max_steps 100`.
    Ctrl-C stops at a checkpoint; `--resume` continues from it.
    """
    from appliance import api
    from appliance.errors import UsageError
    from appliance.output import TrainProgress
    from appliance.train.config import load_recipe

    overrides = _overrides(sets, ctx.args)
    for note in load_recipe(recipe, overrides).notes:  # a bad recipe is reported before the passphrase is asked
        err.print(f"note: {note}", markup=False)
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give node 0's address and a free port")
    progress = TrainProgress(not c.json)
    with c.open_vault() as v:
        try:
            res = api.train_run(v, recipe, overrides, resume, gpus, nnodes, node_rank, rdzv_endpoint, progress)
        finally:
            progress.stop()
    c.emit(res, lambda: out.print(
        f"{res['id']}: {res['stage']}/{res['method']}, {res['steps']} steps, final loss "
        f"{num(res['loss'])}, "
        f"{res['tokens_per_s']:,.0f} tok/s, padding {res['data']['padding_fraction']:.2%}\n"
        f"saved to {res['model_path'] or 'node 0 (this node ran worker ranks only)'}"
        + (f"\nmerged: {res['merged']}" if res["merged"] else "")))


@command(train_group, "recipes")
@click.option("--keys", is_flag=True, help="List every recipe key with its default and meaning.")
def train_recipes_cmd(c: Ctx, keys):
    """The shipped recipes (model presets and stages), or every recipe key."""
    from appliance import api

    if keys:
        rows = api.train_recipes(keys=True)["keys"]
        c.emit({"keys": rows}, lambda: table(["key", "default", "meaning"],
                                             [[r["key"], str(r["default"]), r["help"]] for r in rows]))
        return
    items = api.train_recipes(home=c.home)["recipes"]
    c.emit({"recipes": items}, lambda: (table(
        ["recipe", "stage", "arch", "parameters", "vocabulary"],
        [[i["name"], f"{i['stage']}/{i['method']}", i["arch"] or "base model", _params(i["parameters"]),
          _vocab(i["parameters"])] for i in items]),
        [out.print(f"{i['name']}: {i['purpose']}", markup=False) for i in items if i.get("purpose")],
        out.print("run one with `appliance train run NAME`; see its first line for an example "
                  "(`appliance train recipes --json`)")))


def _params(p: dict | None) -> str:
    if not p:
        return "-"
    fmt = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"  # noqa: E731
    return fmt(p["total"]) + (f" ({fmt(p['active'])} active)" if p["active"] != p["total"] else "")


def _vocab(p: dict | None) -> str:
    if not p:
        return "base model's"
    return f"{p['vocab_size']:,} ({p['vocab_from']})" if p.get("vocab_from") else f"{p['vocab_size']:,} (assumed)"


@command(train_group, "import")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name; imported as NAME@K.")
def train_import_cmd(c: Ctx, src, name):
    """Import a base model from a local transformers directory (e.g. unpacked from a bundle)."""
    from appliance import api

    with c.open_vault() as v:
        res = api.train_import(v, src, name)
    c.emit(res, f"{res['id']}: {', '.join(res['architectures'] or ['model'])} from {src}\nsaved to {res['path']}")


@command(train_group, "merge")
@click.argument("adapter")
def train_merge_cmd(c: Ctx, adapter):
    """Merge a LoRA adapter (NAME@K) into its base: a plain model directory NAME-merged@K."""
    from appliance import api

    with c.open_vault() as v:
        res = api.train_merge(v, adapter)
    c.emit(res, f"{res['id']}: saved to {res['path']}")


@command(train_group, "runs")
@click.option("--name", default=None, help="Only runs of this name.")
def train_runs_cmd(c: Ctx, name):
    """Training runs, newest last, with their status and step."""
    from appliance import api

    with c.open_vault(read_only=True) as v:
        rows = api.train_runs(v, name)["runs"]
    c.emit({"runs": rows}, lambda: table(
        ["run", "stage", "status", "step", "updated", "error"],
        [[r["id"], f"{r['stage']}/{r['method']}", r["status"], f"{r['step']}/{r['max_steps']}",
          (r["updated"] or "")[:19], r["error"] or ""] for r in rows]))


@command(train_group, "metrics")
@click.argument("run_id")
def train_metrics_cmd(c: Ctx, run_id):
    """Per-step loss, learning rate, gradient norm and throughput of a run."""
    from appliance import api

    with c.open_vault(read_only=True) as v:
        res = api.train_metrics(v, run_id)
    rows = res["metrics"]
    c.emit(res, lambda: table(
        ["step", "loss", "lr", "grad norm", "tok/s"],
        [[m["step"], num(m["loss"]), num(m["lr"], 3), num(m["grad_norm"]), f"{m['tokens_per_s']:,.0f}"]
         for m in rows]))


@command(train_group, "models")
def train_models_cmd(c: Ctx):
    """Models and adapters in the appliance (trained, merged or imported)."""
    from appliance import api

    with c.open_vault(read_only=True) as v:
        items = api.train_models(v)["models"]
    c.emit({"models": items}, lambda: table(["model", "kind", "made by", "created"],
                                           [[i["id"], i["kind"], f"{i['stage'] or 'import'}/{i['method'] or '-'}",
                                             i["created"]] for i in items]))


# --- lineage and audit ---------------------------------------------------------------------------
@command(cli, "lineage")
@click.argument("node_id")
def lineage_cmd(c: Ctx, node_id):
    """Print what NODE_ID (a dataset version, model, ...) came from, as a tree."""
    from appliance import api
    from appliance.vault import lineage

    with c.open_vault(read_only=True) as v:
        t = api.lineage(v, node_id)["lineage"]
    c.emit({"lineage": t}, lambda: out.print("\n".join(lineage.render(t))))


@cli.group("audit")
def audit_group():
    """The tamper-evident audit log."""


@command(audit_group, "verify")
def audit_verify_cmd(c: Ctx):
    """Check the hash chain: any edited, deleted or reordered entry is reported."""
    from appliance import api

    with c.open_vault(read_only=True) as v:
        rep = api.audit_verify(v)
    failure = CheckFailed(f"audit log verification failed ({len(rep['problems'])} problem(s))",
                          "the log was altered outside the appliance")
    c.emit(_with_error(rep, None if rep["ok"] else failure), lambda: out.print(
        f"{'ok' if rep['ok'] else 'FAILED'}: {rep['entries']} entries" + "".join(f"\n  {p}" for p in rep["problems"])))
    if not rep["ok"]:
        raise failure


@command(audit_group, "log")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--action", default=None, help="Filter by action, e.g. 'vault.*'.")
def audit_log_cmd(c: Ctx, limit, action):
    """Show the newest audit entries."""
    from appliance import api

    with c.open_vault(read_only=True) as v:
        rows = api.audit_log(v, limit, action)["entries"]
    c.emit({"entries": rows}, lambda: table(
        ["seq", "time", "actor", "action", "ids", "details"],
        [[r["seq"], r["ts"][:19], r["actor"], r["action"], ",".join(r["ids"]),
          ", ".join(f"{k}={val}" for k, val in r["details"].items())] for r in rows]))


# --- the JSON contract ---------------------------------------------------------------------------
@command(cli, "schema")
@click.argument("command_words", nargs=-1)
def schema_cmd(c: Ctx, command_words):
    """The JSON Schema of a command's --json output (`appliance schema vault show`), or the list of them."""
    import json as _json

    from appliance import schemas

    if not command_words:
        names = schemas.commands()
        return c.emit({"version": schemas.JSON_SCHEMA_VERSION, "commands": names,
                       "error": schemas.ERROR}, lambda: out.print("\n".join(names)))
    name = " ".join(command_words)
    doc = schemas.schema(name)
    c.emit({"command": name, "version": schemas.JSON_SCHEMA_VERSION, "json_schema": doc},
           lambda: out.print(_json.dumps(doc, indent=2), markup=False))


# --- the console ---------------------------------------------------------------------------------
@command(cli, "tui")
@click.option("--keys", "keys", type=click.Path(path_type=Path), default=None,
              help="Key map TOML ([keys] action = \"key\"); default ~/.config/appliance/keys.toml.")
@click.option("--mono", is_flag=True, help="No colours (as with NO_COLOR set).")
def tui_cmd(c: Ctx, keys, mono):
    """The operator's console: unlock, then dashboard, vault, train, models, bundles and audit screens.

    Every action is on a key shown in the footer and in the command palette (Ctrl+P). Jobs started here
    keep running when the console closes.
    """
    from appliance.tui.actions import load_keymap

    keymap = load_keymap(keys)  # a bad key map is reported on any terminal, or none
    home = c.home
    if not home.exists():
        raise VaultError(f"no vault at {home.root}", "run `appliance init` or pass --home")
    if not sys.stdout.isatty():
        raise UsageError("the console needs a terminal", "run it in a terminal (or use the CLI commands)")
    if mono:
        os.environ["NO_COLOR"] = "1"
    from appliance.tui.app import ApplianceApp

    ApplianceApp(home, keymap).run()


# --- samples and demo ----------------------------------------------------------------------------
@command(cli, "samples")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=7, show_default=True)
def samples_cmd(c: Ctx, out_dir, seed):
    """Write the synthetic sample corpus (fake data, fake PII) to a directory."""
    from appliance.samples import generate

    manifest = generate(out_dir, seed)
    c.emit(manifest, f"wrote {manifest['files']} files ({human_bytes(manifest['bytes'])}) to {out_dir}")


@command(cli, "demo")
def demo_cmd(c: Ctx):
    """Run the end-to-end pipeline on the bundled sample data, in a home of its own.

    The demo home defaults to ~/.local/share/appliance-demo (never your real vault) and is rebuilt on
    every run; a non-empty directory that no demo made is refused.
    """
    from appliance.demo import demo_home, run_demo

    summary = run_demo(demo_home(c.home_arg), say=(lambda s: None) if c.json else out.print)
    c.emit(summary)


def _with_error(data: dict, failure: ApplianceError | None) -> dict:
    if failure is None:
        return data
    return {**data, "ok": False, "error": failure.message, "hint": failure.hint, "exit_code": failure.exit_code}


# --- quantize, generate, chat, serve (their own module: appliance/cli_quantize.py) --------------------
import appliance.cli_agents  # noqa: E402,F401  (registers grant, mcp)
import appliance.cli_bundles  # noqa: E402,F401  (registers keys, trust, bundle)
import appliance.cli_eval  # noqa: E402,F401  (registers eval)
import appliance.cli_jobs  # noqa: E402,F401  (registers jobs)
import appliance.cli_ops  # noqa: E402,F401  (registers doctor)
import appliance.cli_quantize  # noqa: E402,F401  (registers its commands on `cli`)
import appliance.cli_synth  # noqa: E402,F401  (registers synth)


# --- entry point ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    os.umask(0o077)
    protect_process()  # no core dumps, /proc/PID/{environ,mem} root's only: this process may hold keys
    # No path may reach a model hub or send telemetry; transformers' advice about a missing torch is noise.
    for k, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                     ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, value)
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    try:
        cli.main(args=argv, prog_name="appliance", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        if as_json:
            _fail(True, "missing command", f"see `{e.ctx.command_path if e.ctx else 'appliance'} --help`", 2)
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:
        _fail(as_json, e.format_message().rstrip("."), "see `appliance --help`" if not e.ctx else
              f"see `{e.ctx.command_path} --help`", 2)
    except click.exceptions.Abort:
        _fail(as_json, "interrupted", None, 130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except ApplianceError as e:
        _fail(as_json and not e.json_emitted, e.message, e.hint, e.exit_code)
    except BundleError as e:  # the light `bundles` package has its own root error
        _fail(as_json, e.message, e.hint, e.exit_code)
    except KeyboardInterrupt:
        _fail(as_json, "interrupted", "nothing half-done was kept", 130)
    except Exception as e:  # last resort: one line, never a traceback
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(as_json, f"unexpected {type(e).__name__}: {first}", "rerun with APPLIANCE_DEBUG=1 for details", 1)


def _fail(as_json: bool, message: str, hint: str | None, code: int) -> None:
    err.print(one_line(message, hint, code), markup=False)
    if as_json and code != 3:
        emit_json({"ok": False, "error": message, "hint": hint, "exit_code": code})
    sys.exit(code)
