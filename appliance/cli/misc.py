"""`appliance schema`, `tui`, `samples`, `demo`: the JSON contract, the console and the showcase."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from appliance import api
from appliance.api.format import human_bytes
from appliance.cli.app import Ctx, cli, command
from appliance.cli.output import out
from appliance.errors import UsageError, VaultError


# --- the JSON contract ---------------------------------------------------------------------------
@command(cli, "schema")
@click.argument("command_words", nargs=-1)
def schema_cmd(c: Ctx, command_words):
    """The JSON Schema of a command's --json output (`appliance schema vault show`), or the list of them."""
    import json as _json

    if not command_words:
        listing = api.schema()
        return c.emit(listing, lambda: out.print("\n".join(listing["commands"])))
    res = api.schema(" ".join(command_words))
    c.emit(res, lambda: out.print(_json.dumps(res["json_schema"], indent=2), markup=False))


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
    from appliance.tui.app import ApplianceApp

    keymap = ApplianceApp.load_keymap(keys)  # a bad key map is reported on any terminal, or none
    home = c.home
    if not home.exists():
        raise VaultError(f"no vault at {home.root}", "run `appliance init` or pass --home")
    if not sys.stdout.isatty():
        raise UsageError("the console needs a terminal", "run it in a terminal (or use the CLI commands)")
    if mono:
        os.environ["NO_COLOR"] = "1"
    ApplianceApp(home, keymap).run()


# --- samples and demo ----------------------------------------------------------------------------
@command(cli, "samples")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=7, show_default=True)
def samples_cmd(c: Ctx, out_dir, seed):
    """Write the synthetic sample corpus (fake data, fake PII) to a directory."""
    manifest = api.samples(out_dir, seed)
    c.emit(manifest, f"wrote {manifest['files']} files ({human_bytes(manifest['bytes'])}) to {out_dir}")


@command(cli, "demo")
@click.option("--quick", is_flag=True, help="Every stage with a few training steps each: checks a box in a few "
              "minutes; the models it trains do not answer the sample questions.")
def demo_cmd(c: Ctx, quick):
    """Run the end-to-end pipeline on the bundled sample data, in a home of its own.

    The demo home defaults to ~/.local/share/appliance-demo (never your real vault) and is rebuilt on
    every run; a non-empty directory that no demo made is refused.
    """
    from appliance.demo import demo_home, run_demo  # the showcase drives every skin: started, as `tui` is

    summary = run_demo(demo_home(c.home_arg), say=(lambda s: None) if c.json else out.print, quick=quick)
    c.emit(summary)

