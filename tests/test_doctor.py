"""`appliance doctor`: every check says ok, warn or fail with its fix; failures exit 1 with one clear line."""

from __future__ import annotations

import os

from tests.conftest import PASSPHRASE

STATUSES = {"ok", "warn", "fail"}


def by_name(rep: dict) -> dict[str, dict]:
    return {c["check"]: c for c in rep["checks"]}


def test_a_healthy_home_passes_and_each_line_has_its_fix(home, cli):
    r = cli("--home", home, "--json", "doctor")
    rep = r.json
    checks = by_name(rep)
    assert {"python", "torch", "gpus", "nccl", "duckdb", "llama.cpp", "disk", "home", "vault", "audit", "clock",
            "swap", "core dumps", "user", "package duckdb", "package torch"} <= set(checks)
    assert all(c["status"] in STATUSES and c["detail"] for c in rep["checks"])
    assert all(c["fix"] for c in rep["checks"] if c["status"] != "ok")  # nothing wrong without what to do
    assert checks["duckdb"]["status"] == "ok" and checks["home"]["status"] == "ok"
    assert checks["vault"]["status"] == "ok" and checks["audit"]["status"] == "ok"  # the passphrase is in the env
    assert rep["counts"] == {s: sum(c["status"] == s for c in rep["checks"]) for s in STATUSES}
    assert (r.code == 0) == rep["ok"] == (rep["counts"]["fail"] == 0)
    human = cli("--home", home, "doctor")
    assert "✓ duckdb" in human.out and "ok," in human.out.splitlines()[-1]


def test_a_locked_vault_and_a_missing_home_are_warnings(home, cli, monkeypatch, tmp_path):
    monkeypatch.delenv("APPLIANCE_PASSPHRASE", raising=False)
    monkeypatch.delenv("APPLIANCE_PASSPHRASE_FILE", raising=False)
    v = by_name(cli("--home", home, "--json", "doctor").json)["vault"]
    assert v["status"] == "warn" and "locked" in v["detail"] and "APPLIANCE_PASSPHRASE" in v["fix"]
    h = by_name(cli("--home", tmp_path / "none", "--json", "doctor").json)["home"]
    assert h["status"] == "warn" and "appliance init" in h["fix"]


def test_a_home_others_can_read_fails_with_the_command_that_fixes_it(home, cli):
    os.chmod(home, 0o755)
    os.chmod(home / "keyring.json", 0o644)
    r = cli("--home", home, "--json", "doctor")
    assert r.code == 1 and r.json["ok"] is False and "check(s) failed" in r.json["error"]
    h = by_name(r.json)["home"]
    assert h["status"] == "fail" and "0o755" in h["detail"] and "keyring.json 0o644" in h["detail"]
    assert h["fix"].startswith(f"chmod -R go-rwx {home} ")
    err = cli("--home", home, "doctor").err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: doctor: 1 check(s) failed")


def test_backups_kept_in_the_home_are_a_warning(home, cli):
    (home / "backups").mkdir()
    (home / "backups" / "before-schema-2.backup").write_bytes(b"x")
    b = by_name(cli("--home", home, "--json", "doctor").json)["backups"]
    assert b["status"] == "warn" and "vault passwd" in b["detail"] and b["fix"]


def test_the_api_gives_what_the_cli_prints(home, cli):
    from appliance import api

    rep = api.doctor(home, PASSPHRASE)
    cli_rep = cli("--home", home, "--json", "doctor").json
    strip = lambda d: [(c["check"], c["status"]) for c in d["checks"] if c["check"] != "clock"]  # noqa: E731
    assert strip(rep) == strip(cli_rep)
