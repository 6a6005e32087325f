"""Site plugins: functions registered by name, from modules named in an environment variable.

Custom eval metrics (APPLIANCE_EVAL_PLUGINS) and GRPO rewards (APPLIANCE_REWARD_PLUGINS) are each one
`Registry`: a dict of name -> function that built-ins fill with `@registry.register("name")`, and that
`registry.load()` extends by importing every module the variable names (comma-separated import paths; a
module registers its functions as it is imported). A module that cannot be imported is one line, the same for
both: which plugin, what is wrong, what to do (a UsageError, exit code 2).

This module sits below eval and train (it imports only appliance.errors).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from appliance.errors import UsageError


class PluginError(UsageError):
    """A plugin module named in the environment could not be imported."""


class Registry(dict[str, Callable]):
    """Functions by name, of one `kind` ("eval metric", "reward"), extended by the modules named in `env`."""

    def __init__(self, kind: str, env: str):
        super().__init__()
        self.kind, self.env = kind, env

    def register(self, name: str):
        """`@registry.register("name")`: the decorated function is this registry's `name`."""
        def deco(fn):
            self[name] = fn
            return fn
        return deco

    def modules(self) -> list[str]:
        """The plugin modules named in the environment, in order."""
        return [m.strip() for m in (os.environ.get(self.env) or "").split(",") if m.strip()]

    def load(self) -> None:
        """Import every plugin module (an imported one is not run again); PluginError for the first that fails."""
        for mod in self.modules():
            load_module(mod, self.kind, self.env)


def load_module(mod: str, kind: str, env: str) -> None:
    """Import plugin module `mod` (named in `env`); any failure is one PluginError line."""
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - whatever a site's module does wrong is one line
        raise PluginError(f"{kind} plugin {mod} failed to load: {_reason(e)}", _hint(e, mod, env)) from None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _hint(e: Exception, mod: str, env: str) -> str:
    if isinstance(e, ModuleNotFoundError) and e.name and (mod == e.name or mod.startswith(e.name + ".")):
        return f"check the module name in {env} and that its directory is on PYTHONPATH"
    return f"fix the module, or remove it from {env}"
