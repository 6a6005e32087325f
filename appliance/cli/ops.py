"""`appliance doctor`, `appliance wheelhouse build`: thin over `appliance.api` (ops)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import api
from appliance.cli.app import Ctx, cli, command, with_error
from appliance.cli.output import ProgressBar, out
from appliance.errors import CheckFailed


@command(cli, "doctor")
def doctor_cmd(c: Ctx):
    """Check this box: Python and packages, torch and GPUs, DuckDB's signed extension, llama.cpp, disk, the
    home's permissions, swap and core dumps, the vault and its audit chain (when APPLIANCE_PASSPHRASE[_FILE]
    is set), the clock. Exits 1 when a check fails."""
    rep = api.doctor(c.home.root, api.secret_from_env("APPLIANCE_PASSPHRASE"))
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

    c.emit(with_error(rep, failure), human)
    if failure:
        raise failure


@cli.group("wheelhouse")
def wheelhouse_group():
    """Carry the appliance to a box with no network: every wheel it runs on, hash-pinned, with an installer."""


@command(wheelhouse_group, "build")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="New directory to write the wheelhouse into.")
@click.option("--torch", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Which torch build to carry (default: the one installed here).")
@click.option("--from-env", is_flag=True, help="Pack the wheels from the installed environment (no network) "
                                                "instead of downloading them.")
@click.option("--find-links", multiple=True, type=click.Path(path_type=Path),
              help="Also look for wheels in this directory (repeatable); the llama.cpp wheel cache is always used.")
@click.option("--no-index", is_flag=True, help="Download from --find-links directories only.")
@click.option("--torch-index", default=None, help="Package index holding the torch build (default for cpu: "
                                                  "PyTorch's CPU index).")
@click.option("--sign-key", default=None, help="Also write a signed installer bundle, with this key of the home.")
@click.option("--bundle", "bundle_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the installer bundle (with --sign-key).")
@click.option("--compress-level", type=click.IntRange(0, 9), default=1, show_default=True,
              help="zlib level for packed wheels (0: stored, fastest; 9: smallest).")
@click.option("--force", is_flag=True, help="Replace an existing wheelhouse or bundle.")
def wheelhouse_build_cmd(c: Ctx, out_path, torch, from_env, find_links, no_index, torch_index, sign_key, bundle_path,
                         compress_level, force):
    """Write every wheel the appliance runs on (the built llama.cpp wheel and DuckDB's signed extension package
    among them), a hash-pinned requirements file and install.sh, which installs with `pip --no-index` only.
    Run it on a connected machine, or with --from-env anywhere."""
    bar = ProgressBar(not c.json, "packing" if from_env else "bundling")
    try:
        r = api.wheelhouse_build(out_path, torch=torch, from_env=from_env, find_links=list(find_links),
                                 no_index=no_index, torch_index=torch_index, sign_key=sign_key, bundle=bundle_path,
                                 force=force, home=c.home.root, compress_level=compress_level,
                                 progress=bar.callbacks())
    finally:
        bar.stop()

    def human() -> None:
        out.print(f"{r['out']}: {r['wheels']} wheels, {r['bytes'] / 2**20:.0f} MiB, appliance {r['appliance']} "
                  f"for Python {r['python']} on {r['machine']}, torch {r['torch']['version']} "
                  f"({r['torch']['build']}); release {r['release']}")
        if r["bundle"]:
            b = r["bundle"]
            out.print(f"{b['file']}: installer bundle v{b['version']}, signed by {b['signer']}")
        out.print(f"on the far side: sh {r['out']}/install.sh --prefix /opt/appliance")

    c.emit(r, human)
