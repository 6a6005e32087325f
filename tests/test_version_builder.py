"""The one dataset-version builder: a failure at any point leaves no version, records, blobs, tables or lineage."""

from __future__ import annotations

import pytest

from tests.conftest import open_vault


class Boom(Exception):
    pass


def _state(v) -> dict:
    """Everything a dataset version writes, as counts and names (audit entries by action)."""
    one = lambda sql: v.con.execute(sql).fetchone()[0]  # noqa: E731
    return {
        "versions": one("SELECT count(*) FROM versions"),
        "records": one("SELECT count(*) FROM version_records"),
        "sources": one("SELECT count(*) FROM version_sources"),
        "pii": one("SELECT count(*) FROM version_pii"),
        "tables": one("SELECT count(*) FROM version_tables"),
        "blobs": one("SELECT count(*) FROM blobs"),
        "nodes": [i for (i,) in v.con.execute("SELECT id FROM lineage_nodes ORDER BY id").fetchall()],
        "data": [t for (t,) in v.con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'data' "
                                              "ORDER BY 1").fetchall()],
        "audit": [a for (a,) in v.con.execute("SELECT action FROM audit ORDER BY seq").fetchall()],
    }


def _fail_midway(monkeypatch, v, after_files: int, seen: list) -> None:
    """Every record is written at once, and the ingest raises when file number `after_files` ends (its
    records, and a table's rows, already in the database). `seen` gets what the version held by then."""
    from appliance.vault import builder, ingest

    monkeypatch.setattr(builder, "BATCH_BYTES", 1)  # each record reaches the database as it is added
    real, calls = ingest.file_sha256, []

    def sha(item):
        calls.append(item)
        if len(calls) == after_files:
            seen.append(_state(v))
            raise Boom("injected")
        return real(item)

    monkeypatch.setattr(ingest, "file_sha256", sha)


def test_a_failing_ingest_leaves_nothing(home, samples, monkeypatch):
    from appliance.vault.ingest import ingest

    with open_vault(home) as v:
        before, seen = _state(v), []
        _fail_midway(monkeypatch, v, 6, seen)
        with pytest.raises(Boom):
            ingest(v, [samples / "tables", samples / "handbook"], "hb", workers=1)
        (midway,) = seen
        assert midway["versions"] == 1 and midway["records"] > 0 and midway["blobs"] > 0 and midway["data"]
        assert _state(v) == before  # no version (not even pending), record, blob, table or lineage node
        assert v.check().ok
    with open_vault(home) as v:  # nothing left for the next open to discard either
        assert _state(v) == before


def test_a_failing_ingest_on_top_of_a_version_keeps_that_version(home, samples, monkeypatch):
    from appliance.vault.ingest import ingest
    from appliance.vault.versions import show

    with open_vault(home) as v:
        first = ingest(v, [samples / "tables"], "hb", workers=1)
        before, shown, seen = _state(v), show(v.con, "hb@1"), []
        _fail_midway(monkeypatch, v, 3, seen)
        with pytest.raises(Boom):
            ingest(v, [samples / "handbook"], "hb", workers=1)
        assert seen[0]["records"] > before["records"]  # the new version had the old records and new ones
        assert _state(v) == before and show(v.con, "hb@1") == shown
        assert v.check().ok
        monkeypatch.undo()
        again = ingest(v, [samples / "handbook"], "hb", workers=1)  # the number was never taken
        assert again.version == "hb@2" and again.parent == first.version


def test_a_failing_commit_leaves_nothing(home, samples, monkeypatch):
    """The last step fails (lineage, inside the final transaction): the version goes as a whole."""
    from appliance.vault import lineage
    from appliance.vault.ingest import ingest

    with open_vault(home) as v:
        before = _state(v)

        def add_node(*a, **k):
            raise Boom("injected")

        monkeypatch.setattr(lineage, "add_node", add_node)
        with pytest.raises(Boom):
            ingest(v, [samples / "tables"], "hb", workers=1)
        assert _state(v) == before
        assert v.check().ok


def test_nothing_readable_discards_through_the_builder(home, tmp_path):
    from appliance.errors import IngestError
    from appliance.vault.ingest import ingest

    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 not really")
    with open_vault(home) as v:
        before = _state(v)
        with pytest.raises(IngestError):
            ingest(v, [bad], "x", workers=1)
        assert _state(v) == before


def test_a_failing_synth_leaves_nothing(home, samples, monkeypatch):
    """The atomic way (synth, bundle import): one transaction, rolled back whole."""
    from appliance import api
    from appliance.vault import audit
    from appliance.vault.ingest import ingest

    with open_vault(home) as v:
        ingest(v, [samples / "tables"], "plant", workers=1)
        before = _state(v)
        real = audit.append

        def append(con, key, action, *a, **k):
            if action == "vault.synth":
                raise Boom("injected")
            return real(con, key, action, *a, **k)

        monkeypatch.setattr(audit, "append", append)
        with pytest.raises(Boom):
            api.synth_edge_cases(v, "plant@1", "plant-edge", table="equipment", rows=5)
        assert _state(v) == before
        assert v.check().ok
        monkeypatch.undo()
        assert api.synth_edge_cases(v, "plant@1", "plant-edge", table="equipment", rows=5)["version"] == "plant-edge@1"


def test_a_builder_left_without_commit_discards(home):
    from appliance.vault.builder import VersionBuilder
    from appliance.vault.readers import Record

    with open_vault(home) as v:
        before = _state(v)
        for atomic in (False, True):
            with VersionBuilder(v, "loose", pii_mode="redact", validation_fraction=0.05, atomic=atomic) as b:
                b.add(Record(kind="text", source="s", text="hello"), "hello", "ab" * 32, 5)
                b.totals()  # written
            assert _state(v) == before
