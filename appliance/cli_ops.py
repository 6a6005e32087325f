"""`appliance doctor`: thin over `appliance.doctor`."""

from __future__ import annotations

from appliance.cli import Ctx, _with_error, cli, command
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
