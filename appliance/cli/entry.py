"""The `appliance` entry point: registers every command module on the one table, then runs it.

The command modules import only `appliance.cli.app` and `appliance.cli.output` (and `appliance.api`), never
this module, so the package has no import cycle: output <- app <- vault, train, eval, ... <- entry <- appliance.cli.
"""

from __future__ import annotations

import os
import sys

import click

# The command table: each module registers its commands on `cli` as it is imported.
import appliance.cli.agents  # noqa: F401  (grant, mcp)
import appliance.cli.bundles  # noqa: F401  (keys, trust, bundle)
import appliance.cli.deploy  # noqa: F401  (deploy, feedback)
import appliance.cli.eval  # noqa: F401  (eval)
import appliance.cli.jobs  # noqa: F401  (jobs)
import appliance.cli.misc  # noqa: F401  (schema, tui, samples, demo)
import appliance.cli.ops  # noqa: F401  (doctor, wheelhouse)
import appliance.cli.quantize  # noqa: F401  (quantize, generate, chat, serve)
import appliance.cli.synth  # noqa: F401  (synth)
import appliance.cli.train  # noqa: F401  (train)
import appliance.cli.vault  # noqa: F401  (init, vault, lineage, audit)
from appliance import api
from appliance.cli.app import cli
from appliance.cli.output import emit_json, err
from appliance.errors import ApplianceError, one_line

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Run `appliance ARGV...` (default: sys.argv[1:]); exits with the contract's exit code."""
    os.umask(0o077)
    api.protect_process()  # no core dumps, /proc/PID/{environ,mem} root's only: this process may hold keys
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
