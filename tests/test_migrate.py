"""Vault schema migrations: older vaults open with this code; a migration backs up, then moves in one step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.errors import VaultError

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_PASSPHRASE = "schema fixture passphrase"


def fixture_home(version: int, parent: Path) -> Path:
    h = parent / f"home-v{version}"
    shutil.copytree(FIXTURES / f"vault-schema-{version}", h, ignore=shutil.ignore_patterns("README.md"))
    h.chmod(0o700)
    return h


def open_(h: Path, read_only: bool = False):
    from appliance.home import Home
    from appliance.vault import Vault

    return Vault.open(Home(h), FIXTURE_PASSPHRASE, read_only=read_only)


def audit_ok(v) -> bool:
    from appliance.vault import audit

    return audit.verify(v.con, v.secrets.audit_key).ok


def schema_of(h: Path) -> int:
    with open_(h, read_only=True) as v:
        return int(v.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])


@pytest.mark.parametrize("version", sorted(int(p.name.rsplit("-", 1)[1]) for p in FIXTURES.glob("vault-schema-*")))
def test_every_schema_fixture_opens_with_this_code(version, tmp_path, cli, monkeypatch):
    from appliance.vault.schema import SCHEMA_VERSION

    h = fixture_home(version, tmp_path)
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", FIXTURE_PASSPHRASE)
    r = cli("--home", h, "--json", "vault", "datasets")  # read-only: a vault from an older schema migrates first
    assert r.code == 0, r.err
    assert [(d["name"], d["latest"]) for d in r.json["datasets"]] == [("site", "site@1")]
    assert cli("--home", h, "vault", "check").code == 0
    assert schema_of(h) == SCHEMA_VERSION
    texts = [t for (t,) in open_(h, read_only=True).con.execute("SELECT text FROM blobs").fetchall()]
    assert any("tarn valve" in t for t in texts)


def test_a_migration_backs_up_first_then_moves_in_one_transaction(tmp_path, monkeypatch, cli):
    from appliance.home import Home
    from appliance.vault import migrate, restore
    from appliance.vault.schema import SCHEMA_VERSION

    h = fixture_home(1, tmp_path)
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", FIXTURE_PASSPHRASE)
    ahead = SCHEMA_VERSION + 1
    with monkeypatch.context() as m:  # this code one schema ahead, with a step from the current one
        m.setattr("appliance.vault.schema.SCHEMA_VERSION", ahead)
        m.setattr("appliance.vault.vault.SCHEMA_VERSION", ahead)
        m.setattr(migrate, "STEPS", {**migrate.STEPS, SCHEMA_VERSION: lambda con: con.execute(
            "ALTER TABLE versions ADD COLUMN reviewed_by VARCHAR")})
        r = cli("--home", h, "--json", "vault", "datasets")  # a read-only command: it migrates first, then reads
        assert r.code == 0 and r.json["datasets"][0]["name"] == "site", r.err
        assert schema_of(h) == ahead
        with open_(h) as v:
            assert v.migrated is None  # once only
            cols = [c for (c,) in v.con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                                "table_name = 'versions'").fetchall()]
            assert "reviewed_by" in cols
            last = v.con.execute("SELECT action, details FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            assert last[0] == "vault.migrate" and audit_ok(v)
        saved = Path(json.loads(last[1])["backup"])
    assert saved.parent == h / "backups" and saved.stat().st_mode & 0o777 == 0o600
    back = tmp_path / "from-backup"  # the backup is the vault as it was: schema 1, the same records
    with monkeypatch.context() as m:  # restored and read as schema 1 code would: this code would migrate it
        m.setattr("appliance.vault.schema.SCHEMA_VERSION", 1)
        m.setattr("appliance.vault.vault.SCHEMA_VERSION", 1)
        res = restore.restore(saved, Home(back), FIXTURE_PASSPHRASE)
        assert res["records"] == 3 and schema_of(back) == 1


def test_a_failing_migration_leaves_the_vault_as_it_was(tmp_path, monkeypatch):
    from appliance.vault import migrate
    from appliance.vault.schema import SCHEMA_VERSION

    h = fixture_home(1, tmp_path)
    with open_(h, read_only=True) as v:
        before = v.con.execute("SELECT count(*) FROM audit").fetchone()[0]

    def half_then_fail(con):
        con.execute("ALTER TABLE versions ADD COLUMN reviewed_by VARCHAR")
        raise RuntimeError("disk on fire")

    ahead = SCHEMA_VERSION + 1
    with monkeypatch.context() as m:  # a step from the current schema that fails (the open above migrated to it)
        m.setattr("appliance.vault.schema.SCHEMA_VERSION", ahead)
        m.setattr("appliance.vault.vault.SCHEMA_VERSION", ahead)
        m.setattr(migrate, "STEPS", {**migrate.STEPS, SCHEMA_VERSION: half_then_fail})
        with pytest.raises(VaultError) as e:
            open_(h)
        assert f"from schema {SCHEMA_VERSION} to {ahead} failed (disk on fire); the vault is unchanged" in \
            e.value.message
        assert "backups" in e.value.hint
        with pytest.raises(VaultError, match="disk on fire"):  # a read-only open tries, and fails the same
            open_(h, read_only=True)
        # each attempt kept its backup, even in one second
        assert len(list((h / "backups").glob(f"before-schema-{ahead}-*.backup"))) == 2
    with open_(h, read_only=True) as v:
        assert v.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        cols = [c for (c,) in v.con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                            "table_name = 'versions'").fetchall()]
        assert "reviewed_by" not in cols
        assert v.con.execute("SELECT count(*) FROM audit").fetchone()[0] == before  # not even an entry
    with open_(h) as v:
        assert v.check().ok and audit_ok(v)
