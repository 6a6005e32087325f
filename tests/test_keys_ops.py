"""Rekey and passwd on a real vault, including a rekey interrupted at each step."""

import os

import duckdb
import pytest

from appliance.home import Home
from appliance.vault import Vault
from appliance.vault.keys import Keyring
from tests.conftest import PASSPHRASE, open_vault


def _state(h):
    with open_vault(h, read_only=True) as v:
        return v.con.execute("SELECT count(*), sha256(string_agg(hash, '' ORDER BY hash)) FROM blobs").fetchone()


def test_rekey_rotates_the_data_key(home, cli, samples):
    cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb")
    before = _state(home)
    with open_vault(home, read_only=True) as v:
        old_key = v.secrets.duckdb_key
    r = cli("--home", home, "vault", "rekey")
    assert r.code == 0, r.err
    assert _state(home) == before
    with open_vault(home, read_only=True) as v:
        assert v.secrets.duckdb_key != old_key
    # a process that let go of the vault (a run, an export) will attach again with the key it has: no rekey
    # meanwhile (checked in-process: flock sees a second open file as another holder)
    with open_vault(home) as detached, detached.released():
        r = cli("--home", home, "vault", "rekey")
        assert r.code == 1 and "a training run, quantize or eval is working on this vault" in r.err
    leftovers = sorted(p.name for p in home.iterdir())
    assert leftovers == [".detached.lock", ".vault.lock", "artifacts", "keyring.json", "logs", "tmp", "vault.duckdb"]
    plain = duckdb.connect()
    with pytest.raises(duckdb.Error):
        plain.execute(f"ATTACH '{home / 'vault.duckdb'}' AS v (ENCRYPTION_KEY '{old_key}', READ_ONLY)")
        plain.execute("SELECT count(*) FROM v.blobs").fetchone()
    assert cli("--home", home, "vault", "check").code == 0
    log = cli("--home", home, "--json", "audit", "log").json["entries"]
    assert [e["details"].get("phase") for e in log if e["action"] == "vault.rekey"] == ["start", "done"]


def _interrupted_rekey(h, stop_after: str):
    """Replay rekey's steps by hand up to `stop_after`, as a crash would leave them."""
    hm = Home(h)
    v = Vault.open(hm, PASSPHRASE)
    from appliance.vault.keys import Secrets
    nxt = Secrets(os.urandom(32), v.secrets.pseudonym_key, v.secrets.audit_key)
    new = hm.database.with_name("vault.duckdb.rekey")
    v.con.execute(f"ATTACH '{new}' AS r (ENCRYPTION_KEY '{nxt.duckdb_key}', ENCRYPTION_CIPHER 'GCM')")
    v.con.execute("COPY FROM DATABASE vault TO r")
    v.con.execute("DETACH r")
    v.close()
    if stop_after == "copy":
        return
    ring = Keyring.load(hm.keyring)
    ring.wrap_pending(PASSPHRASE, nxt, new.name)
    ring.save(hm.keyring)
    if stop_after == "pending":
        return
    os.link(hm.database, hm.database.with_name("vault.duckdb.old"))  # the old file keeps a second name
    if stop_after == "link":
        return
    os.replace(new, hm.database)  # swapped, but the keyring still lists the key as pending


@pytest.mark.parametrize("stop_after", ["copy", "pending", "link", "swap"])
def test_interrupted_rekey_recovers(home, cli, samples, stop_after):
    cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb")
    before = _state(home)
    _interrupted_rekey(home, stop_after)
    assert _state(home) == before  # opening finishes or rolls back the rekey
    ring = Keyring.load(Home(home).keyring)
    assert ring.pending_rekey is None
    assert not (home / "vault.duckdb.rekey").exists() and not (home / "vault.duckdb.old").exists()
    assert cli("--home", home, "vault", "check").code == 0
