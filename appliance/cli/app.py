"""What every command module shares: the root command group, the context, argument helpers, output.

Contract: global `--home DIR` and `--json` (also accepted after any subcommand); passphrase from
APPLIANCE_PASSPHRASE_FILE, APPLIANCE_PASSPHRASE or a terminal prompt. Exit codes: 0 ok, 1 error,
2 usage error, 3 partial (an ingest that landed but skipped unreadable files), 130 interrupted.
Errors are one line on stderr (and `{"ok": false, ...}` on stdout with --json); never a traceback.

The command modules (vault, train, eval, ...) import this one and register their commands on `cli`;
`appliance.cli.entry` imports them all and runs the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from appliance import api
from appliance.cli.output import emit_json, out
from appliance.errors import ApplianceError, UsageError, VaultError


@dataclass
class Ctx:
    home_arg: Path | None = None
    json: bool = False
    verbose: bool = False

    @property
    def home(self):
        """The home (`appliance.home.Home`, through `api.home`): --home, else $APPLIANCE_HOME, else the default."""
        return api.home(self.home_arg)

    def open_vault(self, read_only: bool = False, passphrase: str | None = None):
        home = self.home
        if not home.exists():
            raise VaultError(f"no vault at {home.root}", "run `appliance init` or pass --home")
        return api.open(home.root, passphrase or api.get_passphrase(), read_only=read_only)

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

        c = ctx.find_object(Ctx)
        if home_ is not None:
            c.home_arg = home_
        if json_:
            c.json = True
        c.verbose = c.verbose or verbose_
        name = ctx.command_path.split(" ", 1)[1] if " " in ctx.command_path else ctx.command_path
        api.log_setup(c.home.logs, c.verbose)
        # option names only, never their values (a value can be a query, a path or a passphrase)
        given = sorted(k for k, v in kwargs.items() if v not in (None, False, (), []))
        api.log_debug("command.start", command=name, options=given, home=str(c.home.root))
        t0 = time.perf_counter()
        try:
            result = ctx.invoke(f, c, *args, **kwargs)
        except BaseException as e:
            code = getattr(e, "exit_code", None)
            if isinstance(e, SystemExit):
                code = e.code if isinstance(e.code, int) else 0
            elif code is None:
                code = 130 if isinstance(e, KeyboardInterrupt) else 1
            api.log_setup(c.home.logs, c.verbose)  # `init` and `demo` make the logs directory as they run
            # the error's kind, not its message: a database error can quote a value from the vault
            api.log_event("command.end", logging_level(code), command=name, exit_code=code,
                       seconds=round(time.perf_counter() - t0, 3), error=type(e).__name__)
            raise
        api.log_setup(c.home.logs, c.verbose)
        api.log_event("command.end", command=name, exit_code=0, seconds=round(time.perf_counter() - t0, 3))
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
@click.version_option(api.version(), prog_name="appliance")
@click.pass_context
def cli(ctx, home, json_, verbose):
    """Offline appliance: keep private data in an encrypted vault; train, evaluate and ship models."""
    ctx.obj = Ctx(home, json_, verbose)


def with_error(data: dict, failure: ApplianceError | None) -> dict:
    """`data` as the --json object of a failed check: "ok" false, the error, its hint and exit code."""
    if failure is None:
        return data
    return {**data, "ok": False, "error": failure.message, "hint": failure.hint, "exit_code": failure.exit_code}


def recipe_overrides(sets: tuple[str, ...], extra: list[str]) -> list[str]:
    """`--set k=v` and bare `--section.key value` / `--section.key=value` flags, in order given."""
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

