"""`appliance doctor`, `appliance vault backup|restore`: thin over `appliance.doctor` and `vault.backup`."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli import Ctx, _with_error, cli, command, vault_group
from appliance.errors import CheckFailed
from appliance.output import out


@command(cli, "doctor")
def doctor_cmd(c: Ctx):
    """Check this box: Python and packages, torch and GPUs, DuckDB's signed extension, llama.cpp, disk, the
    home's permissions, swap and core dumps, the vault and its audit chain (when APPLIANCE_PASSPHRASE[_FILE]
    is set), the clock. Exits 1 when a check fails."""
    from appliance import api
    from appliance.passphrase import from_env

    rep = api.doctor(c.home.root, from_env("APPLIANCE_PASSPHRASE"))
    failure = None if rep["ok"] else CheckFailed(f"doctor: {rep['counts']['fail']} check(s) failed",
                                                 "do what each failed line says, then run `appliance doctor` again")

    def human() -> None:
        marks = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]"}
        for ch in rep["checks"]:
            out.print(f"{marks[ch['status']]} {ch['check']:<24} {ch['detail']}", highlight=False)
            if ch["fix"] and ch["status"] != "ok":
                out.print(f"  {'':<24} fix: {ch['fix']}", highlight=False)
        n = rep["counts"]
        out.print(f"{n['ok']} ok, {n['warn']} warning(s), {n['fail']} failed")

    c.emit(_with_error(rep, failure), human)
    if failure:
        raise failure


@command(vault_group, "backup")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="Backup file to write.")
@click.option("--no-checkpoints", is_flag=True, help="Leave out training checkpoints (models are kept).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def backup_cmd(c: Ctx, out_path, no_checkpoints, force):
    """Write an encrypted, verifiable snapshot of the home: vault, wrapped keys, models and the rest."""
    from appliance import api

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
    from appliance import api
    from appliance.passphrase import get_passphrase

    r = api.vault_restore(backup_file, c.home.root, get_passphrase(), force=force)
    c.emit(r, f"restored vault {r['vault_id']} (backed up {r['created']}) to {r['home']}: {r['files']} files, "
              f"{r['records']} records and {r['versions']} versions checked, audit chain of {r['audit_entries']} "
              "entries intact" + (f"; the old home is at {r['replaced']}" if r["replaced"] else ""))
