"""Every console action in one table: its id (the name in keys.toml), key, footer label and palette help.

The footer, the key bindings and the command palette are all built from this table, so an action is never
reachable one way and missing another. Keys are remapped in a TOML file:

    # ~/.config/appliance/keys.toml (or `appliance tui --keys FILE`)
    [keys]
    dashboard = "f1"
    quit = "ctrl+q"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding

from appliance.errors import UsageError


@dataclass(frozen=True)
class Action:
    id: str
    action: str  # a Textual action string, run on the app (screen None) or on the screen
    key: str
    label: str
    help: str
    screen: str | None = None  # the mode it belongs to; None: everywhere


def _go(mode: str, key: str, help_: str) -> Action:
    return Action(mode, f"app.switch_mode('{mode}')", key, mode.capitalize(), help_)


ACTIONS: tuple[Action, ...] = (
    _go("dashboard", "d", "Vault size, datasets, models, jobs and the last audit entries"),
    _go("vault", "v", "Datasets, versions, PII reports, records, SQL and ingest"),
    _go("train", "t", "Launch and watch training runs"),
    _go("models", "m", "Models, their lineage and evals; quantize, evaluate, export"),
    _go("bundles", "b", "Signing keys, trusted keys, bundle export and import"),
    _go("audit", "a", "The audit log and its verification"),
    Action("refresh", "refresh", "r", "Refresh", "Read the vault again"),
    Action("quit", "app.quit", "q", "Quit", "Leave the console (jobs keep running)"),
    Action("ingest", "ingest", "i", "Ingest", "Ingest a file or directory into a dataset", "vault"),
    Action("sql", "sql", "s", "SQL", "Run read-only SQL over the vault", "vault"),
    Action("preview", "preview", "p", "Preview", "Show the selected record's text", "vault"),
    Action("launch", "launch", "n", "Launch", "Start a training job with the form's choices", "train"),
    Action("stop", "stop", "x", "Stop", "Stop the selected job (training stops at a checkpoint)", "train"),
    Action("resume", "resume", "u", "Resume", "Resume the selected stopped training job", "train"),
    Action("quantize", "quantize", "g", "Quantize", "Export the selected model to GGUF (a job)", "models"),
    Action("evaluate", "evaluate", "e", "Evaluate", "Run an eval suite on the selected model (a job)", "models"),
    Action("export_model", "export", "x", "Export", "Export the selected model or GGUF as a signed bundle",
           "models"),
    Action("export_bundle", "export", "x", "Export", "Export a model, GGUF, dataset or eval as a bundle",
           "bundles"),
    Action("import_bundle", "import_bundle", "i", "Import", "Verify a bundle, then import it", "bundles"),
    Action("new_key", "new_key", "n", "New key", "Create a signing key", "bundles"),
    Action("verify", "verify", "c", "Verify", "Check the audit log's hash chain", "audit"),
)
BY_ID = {a.id: a for a in ACTIONS}


SCREENS = Binding.Group("Screens ", compact=True)  # the six screen keys share one footer entry


def bindings(screen: str | None) -> list[Binding]:
    return [Binding(a.key, a.action, a.label, id=a.id, group=SCREENS if a.action.startswith("app.switch_mode")
                    else None) for a in ACTIONS if a.screen == screen]


def for_screen(screen: str | None) -> list[Action]:
    """What the palette offers on `screen`: its own actions and the global ones."""
    return [a for a in ACTIONS if a.screen in (None, screen)]


def default_keymap_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "appliance" / "keys.toml"


def load_keymap(path: Path | None) -> dict[str, str]:
    """`{action id: key}` from a keys.toml; a missing default file is no overrides, a bad one an error."""
    explicit = path is not None
    path = path or default_keymap_path()
    if not path.is_file():
        if explicit:
            raise UsageError(f"no key map file {path}", "pass an existing TOML file to --keys")
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid TOML ({e})", "fix the file; see `appliance tui --help`") from None
    keys = raw.get("keys", {})
    if not isinstance(keys, dict):
        raise UsageError(f"{path}: [keys] must be a table of action = \"key\"", "see `appliance tui --help`")
    unknown = sorted(set(keys) - set(BY_ID))
    if unknown:
        raise UsageError(f"{path}: unknown action(s) {', '.join(unknown)}",
                         "actions: " + ", ".join(BY_ID))
    bad = sorted(k for k, v in keys.items() if not isinstance(v, str) or not v.strip())
    if bad:
        raise UsageError(f"{path}: the key for {', '.join(bad)} must be a non-empty string", 'e.g. quit = "ctrl+q"')
    return {k: v.strip() for k, v in keys.items()}
