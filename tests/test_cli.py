"""The command-line contract: --home, --json, passphrase sources, one-line errors, exit codes."""

import json
import subprocess

from tests.conftest import PASSPHRASE, PY, python_env


def test_init_json_and_refuses_twice(tmp_path, cli):
    h = tmp_path / "h"
    r = cli("--home", h, "--json", "init")
    assert r.code == 0 and r.json["ok"] is True and r.json["kdf"]["memory_kib"] >= 65536
    assert (h / "keyring.json").exists() and (h / "vault.duckdb").exists()
    assert oct((h).stat().st_mode & 0o777) == "0o700"
    r = cli("--home", h, "init")
    assert r.code == 1 and r.err.startswith("error: a vault already exists")


def test_wrong_passphrase_is_one_line_exit_1(home, cli, monkeypatch):
    before = (home / "vault.duckdb").stat().st_mtime_ns, (home / "keyring.json").read_bytes()
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "not the passphrase")
    r = cli("--home", home, "vault", "datasets")
    assert r.code == 1
    assert r.err.strip() == "error: wrong passphrase; check APPLIANCE_PASSPHRASE[_FILE] or type it again"
    assert "Traceback" not in r.err + r.out
    assert ((home / "vault.duckdb").stat().st_mtime_ns, (home / "keyring.json").read_bytes()) == before


def test_passphrase_file_wins(home, cli, tmp_path, monkeypatch):
    f = tmp_path / "pp"
    f.write_text(PASSPHRASE + "\n")
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "wrong one entirely")
    monkeypatch.setenv("APPLIANCE_PASSPHRASE_FILE", str(f))
    assert cli("--home", home, "vault", "datasets").code == 0


def test_no_passphrase_without_terminal(home):
    env = python_env()
    env.pop("APPLIANCE_PASSPHRASE")
    r = subprocess.run([PY, "-m", "appliance", "--home", str(home), "vault", "datasets"], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: no passphrase given; set APPLIANCE_PASSPHRASE_FILE or "
                                "APPLIANCE_PASSPHRASE, or run on a terminal to be asked")


def test_usage_errors_exit_2(cli, tmp_path):
    r = cli("--home", tmp_path, "vault", "ingest", "--dataset", "x")
    assert r.code == 2 and r.err.startswith("error: Missing argument")
    r = cli("vault", "frobnicate")
    assert r.code == 2
    r = cli("--json", "vault")
    assert r.code == 2 and r.json == {"ok": False, "schema": 1, "error": "missing command",
                                      "hint": "see `appliance vault --help`", "exit_code": 2}
    r = cli("--json", "vault", "ingest", "nothing", "--dataset", "Bad Name!", "--home", tmp_path)
    assert r.code == 2 and r.json["ok"] is False and "invalid dataset name" in r.json["error"]


def test_missing_vault(cli, tmp_path):
    r = cli("--home", tmp_path / "none", "vault", "datasets")
    assert r.code == 1 and "no vault at" in r.err and "appliance init" in r.err


def test_globals_after_subcommand(home, cli):
    r = cli("vault", "datasets", "--home", home, "--json")
    assert r.code == 0 and r.json == {"ok": True, "schema": 1, "datasets": []}


def test_home_from_environment(home, cli, monkeypatch):
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    assert cli("--json", "vault", "datasets").json["ok"] is True


def test_passwd(home, cli, monkeypatch):
    monkeypatch.setenv("APPLIANCE_NEW_PASSPHRASE", "brand new passphrase")
    r = cli("--home", home, "vault", "passwd")
    assert r.code == 0, r.err
    assert cli("--home", home, "vault", "datasets").code == 1  # old passphrase no longer opens it
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "brand new passphrase")
    assert cli("--home", home, "vault", "datasets").code == 0
    monkeypatch.setenv("APPLIANCE_NEW_PASSPHRASE", "short")
    r = cli("--home", home, "vault", "passwd")
    assert r.code == 1 and "too short" in r.err


def test_every_command_speaks_json(home, cli, samples):
    cmds = [
        ["vault", "ingest", samples / "handbook", "--dataset", "hb"],
        ["vault", "datasets"], ["vault", "show", "hb@1"], ["vault", "sql", "SELECT 1 AS one"],
        ["vault", "check"], ["audit", "verify"], ["audit", "log"], ["lineage", "hb@1"],
    ]
    for c in cmds:
        r = cli("--home", home, "--json", *c)
        assert r.code == 0, (c, r.err)
        d = json.loads(r.out)
        assert d["ok"] is True and d["schema"] == 1, c
