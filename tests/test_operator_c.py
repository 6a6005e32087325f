"""Issue 23, the operator's day (part C): the console shows every run, the vault screen starts on its table and
shows where records came from, the unlock error fits its box, the dashboard's record count is named; records
are read without SQL (`vault records`, `vault record`), `vault show` gives PII per file, `vault sql` fits the
terminal and prints CSV or JSON; an imported artifact's lineage shows the sender's side and answers to the
sender's id; `bundle verify` at the signing home checks against its own keys."""

from __future__ import annotations

import csv
import io
import json

from textual.widgets import DataTable, Label

from tests.conftest import PASSPHRASE, open_vault
from tests.test_bundles import model_home  # noqa: F401 - a fixture: train_home plus an imported model tiny@1
from tests.test_tui import drive, rows, text, tui_base, tui_home, unlock, until  # noqa: F401


# --- the console -------------------------------------------------------------------------------------
def test_the_train_screen_lists_runs_started_from_the_cli_with_their_loss_curve(tui_home, cli, monkeypatch):  # noqa: F811
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
    listed = cli("--home", tui_home, "--json", "train", "runs").json["runs"]
    monkeypatch.delenv("APPLIANCE_PASSPHRASE")
    assert [r["id"] for r in listed] == ["pilot@1"]  # trained by the core directly, not as a job

    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("t")
        await until(pilot, lambda: rows(app, "#train-jobs"))
        assert rows(app, "#train-jobs")[0][:5] == ["cli", "done", "pretrain/full", "pilot@1", "2/2"]
        await until(pilot, lambda: "pilot@1 (done): step 2/2" in text(app, "#train-stats"))
        assert len(app.screen.query_one("#loss-plot").values) == 2
        await pilot.press("x")  # not a job: the console says where to stop it instead of failing
        await until(pilot, lambda: any("started outside the console" in str(n.message) for n in app._notifications))

    drive(tui_home, flow)


def test_the_vault_screen_starts_on_the_table_and_records_show_their_source(tui_home):  # noqa: F811
    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("v")
        await until(pilot, lambda: len(rows(app, "#versions")) == 3)
        assert app.focused is app.screen.query_one("#versions", DataTable)
        await pilot.press("enter")  # the first version, without tabbing into the table first
        await until(pilot, lambda: text(app, "#report").startswith("handbook@1"))
        await until(pilot, lambda: rows(app, "#records"))
        sources = [r[3] for r in rows(app, "#records")]
        assert all(sources) and any(s.endswith(".md") for s in sources)
        await pilot.press("p")
        await until(pilot, lambda: text(app, "#preview").startswith("handbook@1 #0"))
        assert text(app, "#preview").splitlines()[0].endswith(sources[0][-20:])

    drive(tui_home, flow)


def test_the_unlock_error_line_wraps_inside_its_box(tui_home):  # noqa: F811
    async def flow(pilot, app):
        await pilot.press(*"not the passphrase", "enter")
        await until(pilot, lambda: "wrong" in text(app, "#unlock-message"))
        label = app.screen.query_one("#unlock-message", Label)
        message = text(app, "#unlock-message")
        box = app.screen.query_one("#unlock")
        assert len(message) > box.content_region.width  # long enough to need a second line
        assert label.region.right <= box.content_region.right
        shown = " ".join("".join(seg.text for seg in label.render_line(y)).strip() for y in range(label.size.height))
        assert " ".join(shown.split()) == " ".join(message.split())  # every word shown, none cut

    drive(tui_home, flow)


def test_the_dashboard_names_the_sum_of_the_versions_records(tui_home, cli, samples, monkeypatch):  # noqa: F811
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
    assert cli("--home", tui_home, "vault", "ingest", samples / "handbook", "-d", "mail").code == 0  # mail@2
    monkeypatch.delenv("APPLIANCE_PASSPHRASE")
    with open_vault(tui_home, read_only=True) as v:
        total = v.con.execute("SELECT sum(records) FROM versions WHERE status = 'committed'").fetchone()[0]
        distinct = v.con.execute("SELECT count(*) FROM blobs").fetchone()[0]
    assert total > distinct  # mail@2 holds mail@1's records again and the handbook's, stored once

    async def flow(pilot, app):
        await unlock(pilot, app)
        assert f"4 versions, {total} records summed over them" in text(app, "#summary")

    drive(tui_home, flow)


# --- reading what is stored without SQL ------------------------------------------------------------
def test_vault_records_filters_in_sql_and_vault_record_prints_one(train_home, cli):
    h = train_home
    everything = cli("--home", h, "--json", "vault", "records", "handbook@1", "--limit", "1000").json
    assert everything["total"] == len(everything["records"]) > 5
    first = everything["records"][0]
    assert first["id"] == "handbook@1#0" and first["source"].endswith(".md") and first["path"] is None

    page = cli("--home", h, "--json", "vault", "records", "handbook@1", "--limit", "2", "--offset", "3").json
    assert [r["id"] for r in page["records"]] == [r["id"] for r in everything["records"][3:5]]
    assert page["total"] == everything["total"]

    grepped = cli("--home", h, "--json", "vault", "records", "handbook@1", "--grep", "CALIBRATION").json
    assert 0 < grepped["total"] < everything["total"]
    for r in grepped["records"]:
        rec = cli("--home", h, "--json", "vault", "record", r["id"]).json
        assert "calibration" in rec["text"].lower()
    tail = "/".join(first["source"].split("/")[-2:])  # the file by its last components
    by_file = cli("--home", h, "--json", "vault", "records", "handbook@1", "--file", tail).json
    assert by_file["total"] >= 1 and {r["source"] for r in by_file["records"]} == {first["source"]}
    # values are bound, never spliced into the SQL
    odd = cli("--home", h, "--json", "vault", "records", "handbook@1", "--grep", "x'); DROP TABLE blobs; --")
    assert odd.code == 0 and odd.json["total"] == 0
    assert cli("--home", h, "--json", "vault", "records", "handbook@1", "--limit", "1").json["total"] > 0

    rec = cli("--home", h, "--json", "vault", "record", "handbook@1#0").json
    assert (rec["source"], rec["kind"], rec["split"]) == (first["source"], first["kind"], first["split"])
    human = cli("--home", h, "vault", "record", "handbook@1#0")
    assert human.code == 0 and f"source: {first['source']}" in human.out and rec["text"][:40] in human.out
    listing = cli("--home", h, "vault", "records", "handbook@1", "--limit", "3")
    assert "handbook@1#0" in listing.out and "of " + str(everything["total"]) in listing.err
    assert cli("--home", h, "vault", "record", "handbook@1").code == 2  # not an id: NAME@N#ORD

    from appliance import api
    with api.open(h, PASSPHRASE, read_only=True) as v:
        assert api.vault_records(v, "handbook@1", grep="calibration", text=False)["total"] == grepped["total"]
        assert api.vault_record(v, "handbook@1#0")["text"] == rec["text"]


def test_vault_show_gives_the_pii_of_each_file(train_home, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrow on purpose: long paths fold over several lines
    info = cli("--home", train_home, "--json", "vault", "show", "mail@1").json
    per_file = info["pii"]["per_file"]
    assert per_file
    printed = cli("--home", train_home, "vault", "show", "mail@1").out
    # A long path folds over several lines of its cell: join each column of the two-column table.
    cells = [ln.split("│")[1:3] for ln in printed.splitlines() if ln.count("│") == 3]
    files, found = ("".join("".join(c[i].split()) for c in cells) for i in (0, 1))
    for path, counts in per_file.items():
        want = "".join(", ".join(f"{k} {n}" for k, n in counts.items()).split())
        assert path in files and want in found, path


def test_vault_sql_fits_the_terminal_and_prints_csv_or_json(train_home, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    q = "SELECT hash, text FROM blobs ORDER BY hash LIMIT 3"
    r = cli("--home", train_home, "vault", "sql", q)
    assert r.code == 0
    lines = r.out.splitlines()
    assert len(lines) == 3 + 4  # one line per row: top, header, rule, three rows, bottom
    assert all(len(ln) <= 80 for ln in lines) and "…" in r.out
    full = cli("--home", train_home, "--json", "vault", "sql", q, "--format", "csv").json
    got = list(csv.reader(io.StringIO(cli("--home", train_home, "vault", "sql", q, "--format", "csv").out)))
    assert got[0] == ["hash", "text"] and [row for row in got[1:]] == full["rows"]
    objs = json.loads(cli("--home", train_home, "vault", "sql", q, "--format", "json").out)
    assert objs == [dict(zip(full["columns"], row)) for row in full["rows"]]


# --- lineage at a receiving site, and checking a bundle before it ships --------------------------------------
def test_a_receiving_site_sees_the_senders_lineage_and_uses_the_senders_id(model_home, cli, tmp_path):  # noqa: F811
    h = model_home
    assert cli("--home", h, "keys", "generate", "--name", "site-a").code == 0
    assert cli("--home", h, "quantize", "tiny@1", "--type", "f16", "--eval", "handbook@1").code == 0
    gb = tmp_path / "gguf.bundle"
    assert cli("--home", h, "bundle", "export", "tiny@1:f16", "--sign-key", "site-a", "--out", gb).code == 0

    edge = tmp_path / "edge"
    assert cli("--home", edge, "init").code == 0
    assert cli("--home", edge, "trust", "add", h / "keys" / "site-a.pub", "--name", "hq").code == 0
    r = cli("--home", edge, "--json", "bundle", "import", gb)
    assert r.code == 0 and r.json["id"] == "tiny.f16@1", r.err

    shown = cli("--home", edge, "lineage", "tiny.f16@1").out
    assert "imported from bundle tiny.f16 v1, signed by hq" in shown
    assert "sender's id: tiny@1:f16" in shown and "sender's lineage:" in shown
    assert "tiny@1:f16 (gguf)" in shown and "tiny@1 (model)" in shown
    # the sender's id is an alias here
    by_alias = cli("--home", edge, "--json", "lineage", "tiny@1:f16")
    assert by_alias.code == 0 and by_alias.json["lineage"]["id"] == "tiny.f16@1", by_alias.err
    # generate, chat and serve find GGUFs without the vault: they take the sender's id too
    gen = cli("--home", edge, "generate", "tiny@1:f16", "The", "--max-tokens", "2", "--temperature", "0")
    assert gen.code == 0, gen.err
    assert "no GGUF" in cli("--home", edge, "generate", "tiny@2:f16", "The", "--max-tokens", "2").err
    assert cli("--home", edge, "keys", "generate", "--name", "edge").code == 0
    again = cli("--home", edge, "--json", "bundle", "export", "tiny@1:f16", "--sign-key", "edge", "--out",
                tmp_path / "again.bundle")
    assert again.code == 0 and again.json["id"] == "tiny.f16@1", again.err


def test_the_signing_home_verifies_its_own_bundle_before_it_ships(model_home, cli, tmp_path):  # noqa: F811
    h = model_home
    assert cli("--home", h, "keys", "generate", "--name", "site-a").code == 0
    b = tmp_path / "tiny.bundle"
    assert cli("--home", h, "bundle", "export", "tiny@1", "--sign-key", "site-a", "--out", b).code == 0
    r = cli("--home", h, "--json", "bundle", "verify", b)
    assert r.code == 0 and r.json["own_key"] == "site-a" and r.json["signer"] == "site-a", r.err
    human = cli("--home", h, "bundle", "verify", b)
    assert human.code == 0 and "signed by this home's own key site-a" in human.out
    assert "not trusted here" in cli("--home", h, "bundle", "import", b).err  # importing still needs trust
    # a receiving site, with a trust entry for that key, sees the trusted name as before
    edge = tmp_path / "edge"
    assert cli("--home", edge, "init").code == 0
    assert cli("--home", edge, "trust", "add", h / "keys" / "site-a.pub", "--name", "hq").code == 0
    r = cli("--home", edge, "--json", "bundle", "verify", b)
    assert r.code == 0 and r.json["own_key"] is None and r.json["signer"] == "hq"
    assert "signed by hq" in cli("--home", edge, "bundle", "verify", b).out
    # a tampered bundle is still refused at home
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "bad.bundle").write_bytes(bytes(data))
    assert cli("--home", h, "bundle", "verify", tmp_path / "bad.bundle").code == 1
