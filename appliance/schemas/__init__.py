"""The published shape of every `--json` output: one JSON Schema per command, versioned.

Each command prints one object with `"ok"` and `"schema"` (the version below) on stdout. A success object
follows the command's schema (`appliance schema COMMAND` prints it; the files sit beside this module); a
failure is the error object (`ERROR`). Within a version, changes are additive: new keys may appear, keys
are not removed or retyped. Anything else bumps the version.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

JSON_SCHEMA_VERSION = 1  # the "schema" of every --json object
HERE = Path(__file__).parent
# Commands that print no JSON object: they hold a terminal or a stream.
NO_JSON = ("chat", "serve", "tui", "mcp", "jobs work")
ERROR = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "error",
    "type": "object",
    "required": ["ok", "schema", "error", "exit_code"],
    "properties": {"ok": {"const": False}, "schema": {"const": JSON_SCHEMA_VERSION},
                   "error": {"type": "string", "minLength": 1}, "hint": {"type": ["string", "null"]},
                   "exit_code": {"type": "integer", "minimum": 1}},
}


def file_of(command: str) -> Path:
    return HERE / f"{command.replace(' ', '.')}.json"


@cache
def schema(command: str) -> dict:
    """The success schema of `command` ("vault show", "jobs list", ...)."""
    path = file_of(command)
    if not path.is_file():
        from appliance.errors import UsageError

        raise UsageError(f"no JSON schema for {command!r}", "list them with `appliance schema`")
    return json.loads(path.read_text())


def commands() -> list[str]:
    return sorted(p.stem.replace(".", " ") for p in HERE.glob("*.json"))


def validate(command: str, payload: dict) -> None:
    """Raise jsonschema.ValidationError when `payload` is not what `command` publishes."""
    import jsonschema

    chosen = schema(command) if payload.get("ok", True) is not False else ERROR
    jsonschema.validate(payload, chosen, cls=jsonschema.Draft202012Validator)
