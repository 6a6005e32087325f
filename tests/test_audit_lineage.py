"""The audit chain detects edits, deletions and truncation; lineage links versions."""

import pytest

from appliance.vault import audit, lineage
from tests.conftest import open_vault


@pytest.fixture
def audited(home, cli, samples):
    cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb")
    cli("--home", home, "vault", "ingest", samples / "documents", "--dataset", "hb")
    cli("--home", home, "vault", "check")
    return home


def test_clean_log_verifies(audited, cli):
    r = cli("--home", audited, "--json", "audit", "verify")
    assert r.code == 0 and r.json["ok"] and r.json["entries"] == 4
    log = cli("--home", audited, "--json", "audit", "log").json["entries"]
    assert [e["action"] for e in log] == ["vault.init", "vault.ingest", "vault.ingest", "vault.check"]
    assert log[1]["ids"] == ["hb@1"] and log[0]["actor"]


@pytest.mark.parametrize("tamper, expect", [
    ("UPDATE audit SET details = '{\"records\":1}' WHERE seq = 2", "entry 2 (vault.ingest) was altered"),
    ("UPDATE audit SET actor = 'mallory' WHERE seq = 1", "entry 1 (vault.init) was altered"),
    ("DELETE FROM audit WHERE seq = 2", "entry 2 is missing"),
    ("DELETE FROM audit WHERE seq = 4", "entries were removed"),
    ("DELETE FROM audit; DELETE FROM meta WHERE key = 'audit_head'", "the log is empty"),
    ("UPDATE meta SET value = 'x:y' WHERE key = 'audit_head'", "missing or malformed"),
])
def test_tampering_is_detected(audited, cli, tamper, expect):
    with open_vault(audited) as v:  # someone with the database key edits the table directly
        v.con.execute(tamper)
        v.con.execute("CHECKPOINT")
    r = cli("--home", audited, "--json", "audit", "verify")
    assert r.code == 1 and r.json["ok"] is False and "audit log verification failed" in r.json["error"]
    r = cli("--home", audited, "audit", "verify")
    assert expect in r.out
    assert cli("--home", audited, "vault", "check").code == 1


def test_vault_check_detects_changed_records(audited, cli):
    with open_vault(audited) as v:
        v.con.execute("UPDATE blobs SET text = text || ' tampered' WHERE hash = (SELECT min(hash) FROM blobs)")
        v.con.execute("CHECKPOINT")
    r = cli("--home", audited, "vault", "check")
    assert r.code == 1 and "does not match its hash" in r.out and "content hash" not in r.err


def test_lineage_tree_and_render(audited, cli):
    with open_vault(audited) as v:
        lineage.add_node(v.con, "tok-1", "tokenizer", [("hb@2", "data")], attrs={"vocab": 8000})
        with pytest.raises(Exception, match="never reused"):
            lineage.add_node(v.con, "tok-1", "tokenizer")
        t = lineage.tree(v.con, "tok-1")
        assert t["parents"][0]["id"] == "hb@2" and t["parents"][0]["role"] == "data"
        assert t["parents"][0]["parents"][0]["id"] == "hb@1"
        text = "\n".join(lineage.render(t))
        assert text.splitlines()[0].startswith("tok-1 (tokenizer)")
        assert "└── hb@2 (dataset) [data]" in text and "    └── hb@1 (dataset) [previous]" in text
        assert audit.verify(v.con, v.secrets.audit_key).ok
    r = cli("--home", audited, "lineage", "hb")
    assert r.code == 0 and r.out.startswith("hb@2 (dataset)")
    r = cli("--home", audited, "lineage", "nope@1")
    assert r.code == 2 and "no lineage node nope@1" in r.err
