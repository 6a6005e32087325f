"""The --json contract: every command has a published schema, and what it prints follows it.

The `cli` fixture (conftest.py) validates every --json output of every test against its command's schema;
this file adds the commands no other test prints as JSON, the error object, and the coverage checks.
"""

from __future__ import annotations

import click
import jsonschema
import pytest

from appliance import schemas
from appliance.cli import cli as root


def leaf_commands() -> list[str]:
    out = []

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, [*prefix, name])
            else:
                out.append(" ".join([*prefix, name]))
    walk(root, [])
    return sorted(out)


def test_every_command_has_a_schema_and_every_schema_a_command():
    commands = set(leaf_commands())
    assert set(schemas.commands()) == commands - set(schemas.NO_JSON)
    for name in schemas.commands():
        doc = schemas.schema(name)
        jsonschema.Draft202012Validator.check_schema(doc)
        assert doc["properties"]["schema"] == {"const": schemas.JSON_SCHEMA_VERSION}


def test_a_wrong_shape_is_caught():
    good = {"ok": True, "schema": 1, "datasets": []}
    schemas.validate("vault datasets", good)
    for bad in ({"ok": True, "schema": 1}, {"ok": True, "schema": 2, "datasets": []},
                {"ok": True, "schema": 1, "datasets": "none"},
                {"ok": False, "schema": 1, "error": ""}):
        with pytest.raises(jsonschema.ValidationError):
            schemas.validate("vault datasets", bad)


def test_the_rest_of_the_commands_print_what_they_publish(home, cli, tmp_path, samples, monkeypatch):
    """Commands no other test runs with --json; the fixture checks each output against its schema."""
    assert cli("--json", "samples", "--out", tmp_path / "s").json["files"] > 0
    assert cli("--home", home, "--json", "vault", "ingest", samples / "handbook", "-d", "hb").code == 0
    assert cli("--home", home, "--json", "vault", "check").json["ok"]
    assert "tiny-dense" in [r["name"] for r in cli("--json", "train", "recipes").json["recipes"]]
    assert cli("--json", "schema").json["commands"] == schemas.commands()
    assert cli("--json", "schema", "vault", "show").json["json_schema"]["title"] == "appliance vault show --json"
    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key passphrase 1")
    assert cli("--home", home, "--json", "keys", "generate", "--name", "site").code == 0
    assert cli("--home", home, "--json", "keys", "export-public", "site", "--out", tmp_path / "site.pub").code == 0
    assert cli("--home", home, "--json", "trust", "add", tmp_path / "site.pub", "--name", "site").code == 0
    assert [t["name"] for t in cli("--home", home, "--json", "trust", "list").json["trusted"]] == ["site"]
    assert cli("--home", home, "--json", "trust", "remove", "site").code == 0
    monkeypatch.setenv("APPLIANCE_NEW_PASSPHRASE", "another passphrase 5678")
    assert cli("--home", home, "--json", "vault", "passwd").json["changed"] is True
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "another passphrase 5678")
    assert cli("--home", home, "--json", "vault", "rekey").json["rekeyed"] is True
    r = cli("--home", home, "--json", "jobs", "show", "job-1")  # the error object
    assert r.code == 2 and r.json == {"ok": False, "schema": 1, "error": "no job job-1",
                                      "hint": "list them with `appliance jobs list`", "exit_code": 2}


def test_every_command_is_run_with_json_somewhere_in_the_tests():
    """The `cli` fixture checks what it sees; this makes sure it sees every command: each one appears in some
    test's `cli(..., "--json", ...)` call (its words in order among the call's string arguments)."""
    import ast
    from pathlib import Path

    calls: list[list[str]] = []
    for f in Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                words = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if "--json" in words:
                    calls.append(words)

    def run_in(command: str, words: list[str]) -> bool:
        parts = command.split()
        return any(words[i:i + len(parts)] == parts for i in range(len(words)))

    missing = [c for c in schemas.commands() if not any(run_in(c, w) for w in calls)]
    assert not missing, f"never run with --json by a test: {missing}"
