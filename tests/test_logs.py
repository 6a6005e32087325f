"""Structured logs under the home: JSON lines, rotated, 0600; --verbose shows them; never data or secrets."""

from __future__ import annotations

import json

from tests.conftest import PASSPHRASE

MARKER = "HERON-QUARTZ-4417-plaintext-marker"


def test_commands_are_logged_without_vault_content_or_secrets(home, cli, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("id,name\n" + "".join(f"{i},{MARKER}\n" for i in range(20)))
    assert cli("--home", home, "vault", "ingest", src, "--dataset", "marked").code == 0
    cli("--home", home, "vault", "sql", f"SELECT text FROM blobs WHERE text LIKE '%{MARKER}%'")
    cli("--home", home, "vault", "sql", "SELECT CAST(text AS INTEGER) FROM blobs")  # the error quotes a value
    cli("--home", home, "vault", "export", "marked@1", "--out", tmp_path / "x.jsonl")
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "a wrong passphrase, typed by mistake")
    assert cli("--home", home, "vault", "datasets").code == 1
    logs = home / "logs"
    files = sorted(p for p in logs.rglob("appliance.log*"))
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    text = "".join(p.read_text() for p in files)
    assert MARKER not in text and PASSPHRASE not in text and "a wrong passphrase" not in text
    events = [json.loads(ln) for ln in text.splitlines()]
    ends = [e for e in events if e["event"] == "command.end"]
    assert [e["command"] for e in ends][:3] == ["init", "vault ingest", "vault sql"]
    assert ends[1]["exit_code"] == 0 and ends[1]["seconds"] >= 0 and ends[1]["level"] == "info"
    failed = ends[-1]
    assert failed["command"] == "vault datasets" and failed["exit_code"] == 1 and failed["error"] == "WrongPassphrase"
    assert failed["level"] == "error" and all({"ts", "level", "pid", "event"} <= set(e) for e in events)


def test_verbose_shows_the_events_and_the_log_rotates(home, cli, monkeypatch):
    r = cli("--home", home, "--verbose", "vault", "datasets")
    assert r.code == 0 and "debug: command.start command=vault datasets" in r.err and "debug: vault.attach" in r.err
    r = cli("--home", home, "vault", "datasets", "--verbose")  # after the subcommand too
    assert "info: command.end command=vault datasets exit_code=0" in r.err
    assert "command.start" not in cli("--home", home, "vault", "datasets").err  # quiet without it
    monkeypatch.setenv("APPLIANCE_LOG_MAX_BYTES", "600")
    for _ in range(12):
        cli("--home", home, "vault", "datasets")
    rotated = sorted(p.name for p in (home / "logs").glob("appliance.log*"))
    assert rotated[0] == "appliance.log" and "appliance.log.1" in rotated and len(rotated) <= 6


def test_a_log_that_cannot_be_written_does_not_break_the_command(home, cli):
    log = home / "logs" / "appliance.log"
    log.unlink(missing_ok=True)
    log.mkdir()  # what a full disk or a file of another user looks like to the handler: it cannot write
    r = cli("--home", home, "--json", "vault", "datasets")
    assert r.code == 0 and r.json["datasets"] == []
    assert "Traceback" not in r.err and "Logging error" not in r.err
