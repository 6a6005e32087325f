"""Every field that lands is scrubbed: titles, subjects, headings, document properties, file and repository
paths, table names and columns, the manifest. The attack: identifiers put where only text used to be
scrubbed, then looked for in an export, the records, an agent's view and a tokenizer trained on the data.
Also: the PII report by detector and band, `vault pii-review`, and `vault ingest --rescrub`."""

from __future__ import annotations

import json
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, artifact, open_vault

WHO = "Mr. Derek Hollis"  # a name with a signal the detectors know (an honorific)
SSN = "123-45-6789"
MAIL = "derek.hollis@example.org"
SECRETS = ("Hollis", "Derek", SSN, "123456789", MAIL)
TAG = f"{WHO} SSN {SSN}"  # what each field holds


def _attack(root: Path) -> Path:
    """Files whose every field but the body holds a name and an SSN; bodies are harmless."""
    from appliance.samples import write_pdf

    src = root / f"patients {SSN}"  # a directory in the path, too
    (src / "notes").mkdir(parents=True)
    (src / "notes" / f"Lab results for {TAG}.md").write_text(
        f"Lab results for {TAG}\n=====================\n\nThe valve at pump house two was checked.\n")
    (src / "notes" / f"Mr._Derek_Hollis_{SSN}.txt").write_text("No heading: the title is the file's name.\n")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ops@example.org", "ward@example.org", f"Re: {TAG} <{MAIL}>"
    msg.set_content("Pump house two is back in service.\n")
    (src / "mail.eml").write_bytes(bytes(msg))
    import docx

    d = docx.Document()
    d.add_paragraph("The relief valve procedure, step by step.")
    d.core_properties.title = TAG
    d.save(src / "procedure.docx")
    write_pdf(src / "bulletin.pdf", [["Safety bulletin: wear gloves near the compressor."]], TAG)
    rows = "\n".join(f"{i},pump {i},ok" for i in range(40))
    (src / f"{TAG}.csv").write_text(f"id,{TAG},status\n{rows}\n")
    repo = src / f"tools-{SSN}"
    (repo / "src").mkdir(parents=True)
    (repo / ".gitignore").write_text("*.pyc\n")
    (repo / "src" / f"{TAG}.py").write_text("def pressure(bar):\n    return bar * 14.5\n")
    return src


def _leaks(blob: str) -> list[str]:
    return [s for s in SECRETS if s.lower() in blob.lower()]


@pytest.fixture
def attacked(home, cli, tmp_path):
    src = _attack(tmp_path)
    r = cli("--home", home, "--json", "vault", "ingest", src, "--dataset", "ward")
    assert r.code == 0, r.err
    assert not _leaks(r.out), r.out  # the result itself names the files it read
    return home


def test_no_field_keeps_an_identifier(attacked, cli, tmp_path):
    home = attacked
    out = tmp_path / "ward.jsonl"
    assert cli("--home", home, "vault", "export", "ward@1", "--out", out).code == 0
    exported = out.read_text()
    assert len(exported.splitlines()) >= 40 and not _leaks(exported), _leaks(exported)
    # the records carry their fields: titles, paths, sources, metadata
    kinds = {json.loads(line)["kind"] for line in exported.splitlines()}
    assert {"text", "email", "docx", "pdf", "table", "code"} <= kinds
    titles = [json.loads(line)["title"] for line in exported.splitlines()]
    assert any("[SSN]" in (t or "") for t in titles)
    for cmd in (["vault", "show", "ward@1"], ["vault", "records", "ward@1", "--limit", "100"],
                ["vault", "record", "ward@1#0"], ["vault", "pii-review", "ward@1", "--limit", "500"],
                ["vault", "sql", "SELECT * FROM version_sources"], ["vault", "sql", "SELECT * FROM version_pii"],
                ["vault", "sql", "SELECT * FROM version_tables"],
                ["vault", "sql", "SELECT table_name, column_name FROM information_schema.columns "
                                 "WHERE table_schema = 'data'"]):
        r = cli("--home", home, "--json", *cmd)
        assert r.code == 0, (cmd, r.err)
        assert not _leaks(r.out), (cmd, _leaks(r.out))
    # the tables' own rows too
    with open_vault(home, read_only=True) as v:
        (table,) = [t for (t,) in v.con.execute("SELECT table_name FROM version_tables").fetchall()]
        rows = v.con.execute(f'SELECT * FROM data."{table}"').fetchall()
        assert len(rows) == 40 and not _leaks(json.dumps(rows, default=str))


def test_an_agent_sees_no_identifier(attacked, cli):
    from appliance import api

    token = cli("--home", attacked, "--json", "grant", "--agent", "reader", "--caps", "read,records",
                "--hours", "1").json["token"]
    agent = api.agent_open(attacked, PASSPHRASE, token)
    try:
        with agent.session(wait=30) as v:  # as the MCP server runs each call
            seen = [api.agent_vault_show(v, token, "ward@1"), api.agent_vault_datasets(v, token),
                    api.agent_vault_records(v, token, "ward@1", limit=200), api.agent_lineage(v, token, "ward@1"),
                    api.agent_vault_sql(v, token, "SELECT * FROM version_records")]
    finally:
        agent.close()
    blob = json.dumps(seen, default=str)
    assert "[SSN]" in blob and not _leaks(blob), _leaks(blob)


def test_a_tokenizer_learns_no_identifier(attacked, cli):
    r = cli("--home", attacked, "--json", "train", "tokenizer", "--dataset", "ward@1", "--vocab", "400")
    assert r.code == 0, r.err
    with artifact(attacked, r.json["path"]) as d:  # sealed at rest: the vocabulary as it is in memory
        files = [p for p in Path(d).rglob("*") if p.is_file()]
        assert files
        blob = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)
    assert "pump" in blob.lower()  # it did learn the text
    assert not _leaks(blob), _leaks(blob)


def test_the_report_counts_fields_by_detector_and_band(attacked, cli):
    d = cli("--home", attacked, "--json", "vault", "show", "ward@1").json
    assert d["pii"]["total"]["SSN"] >= 7 and d["pii"]["total"]["PERSON"] >= 6
    rows = d["pii"]["by_detector"]
    assert rows and all(set(r) == {"path", "type", "detector", "band", "count"} for r in rows)
    assert {r["band"] for r in rows} <= {"high", "medium", "low"}
    assert sum(r["count"] for r in rows) == sum(d["pii"]["total"].values())
    assert d["warnings"] == []


def test_pii_review_shows_findings_in_context_masked(attacked, cli):
    r = cli("--home", attacked, "--json", "vault", "pii-review", "ward@1", "--limit", "5")
    assert r.code == 0, r.err
    d = r.json
    assert d["version"] == "ward@1" and d["total"] >= 7 and len(d["findings"]) == 5
    scores = [f["score"] for f in d["findings"]]
    assert scores == sorted(scores)
    for f in d["findings"]:
        assert f["type"] in f["context"] and f["field"] in ("text", "title", "path", "source") or \
            f["field"].startswith("meta.")
    fields = {f["field"] for f in cli("--home", attacked, "--json", "vault", "pii-review", "ward@1",
                                      "--limit", "500").json["findings"]}
    assert {"title", "source"} <= fields
    ssn = cli("--home", attacked, "--json", "vault", "pii-review", "ward@1", "--type", "ssn", "--band", "high",
              "--file", "mail.eml").json
    assert ssn["findings"] and all(f["type"] == "SSN" and f["source"].endswith("mail.eml") for f in ssn["findings"])
    human = cli("--home", attacked, "vault", "pii-review", "ward@1")
    assert human.code == 0 and "[SSN]" in human.out and not _leaks(human.out)
    bad = cli("--home", attacked, "vault", "pii-review", "ward@9")
    assert bad.code == 2 and "ward@1" in bad.err
    bad = cli("--home", attacked, "vault", "pii-review", "ward@1", "--type", "FOO")
    assert bad.code == 2 and "unknown PII type" in bad.err and "PERSON" in bad.err
    # the file as the operator knows it on disk: its name is scrubbed as the version scrubbed it
    named = cli("--home", attacked, "--json", "vault", "pii-review", "ward@1", "--limit", "500",
                "--file", f"Mr._Derek_Hollis_{SSN}.txt").json
    assert named["findings"] and all(f["source"].endswith(".txt") for f in named["findings"])
    assert not _leaks(json.dumps(named["findings"]))


def test_flag_mode_review_masks_the_values(home, cli, tmp_path):
    f = tmp_path / "note.md"
    f.write_text(f"# Visit\n\nSeen by {WHO}, SSN {SSN}, mail {MAIL}.\n")
    assert cli("--home", home, "vault", "ingest", f, "--dataset", "flagged", "--pii", "flag").code == 0
    d = cli("--home", home, "--json", "vault", "pii-review", "flagged@1").json
    assert {x["type"] for x in d["findings"]} >= {"SSN", "EMAIL", "PERSON"}
    assert not _leaks(json.dumps(d["findings"]))


def test_flag_mode_review_masks_what_only_the_whole_text_shows(home, cli, tmp_path):
    """A name found from context outside the window (the role that introduced it, far before) and a number the
    window's edge cuts are masked too: scrubbing the window alone showed both."""
    f = tmp_path / "note.md"
    filler = "Observations were stable through the night and the plan is unchanged from yesterday. " * 2
    f.write_text(f"# Visit\n\nPatient Derek Hollis was admitted.\n{filler}Hollis asked about discharge; "
                 f"SSN {SSN}.\n{'x' * 52} call 555-201-3344 or SSN 321-54-9876.\n")
    assert cli("--home", home, "vault", "ingest", f, "--dataset", "flagged", "--pii", "flag").code == 0
    d = cli("--home", home, "--json", "vault", "pii-review", "flagged@1", "--limit", "100").json
    shown = json.dumps(d["findings"], ensure_ascii=False)
    assert "»[SSN]«" in shown and "»[PHONE]«" in shown
    assert not _leaks(shown) and "555-201" not in shown and "321-54" not in shown, shown


def test_rescrub_makes_a_stricter_version_and_marks_what_was_made(home, cli, tmp_path):
    src = _attack(tmp_path)
    assert cli("--home", home, "vault", "ingest", src, "--dataset", "ward", "--pii", "flag").code == 0
    out = tmp_path / "flag.jsonl"
    cli("--home", home, "vault", "export", "ward@1", "--out", out)
    assert _leaks(out.read_text())  # flag keeps what it finds
    tok = cli("--home", home, "--json", "train", "tokenizer", "--dataset", "ward@1", "--vocab", "300")
    assert tok.code == 0, tok.err

    r = cli("--home", home, "--json", "vault", "ingest", "--rescrub", "ward@1")
    assert r.code == 0, r.err
    d = r.json
    assert d["version"] == "ward@2" and d["rescrub_of"] == "ward@1" and d["parent"] == "ward@1"
    assert d["policy_before"]["mode"] == "flag" and d["policy_after"]["mode"] == "redact"
    assert d["pii"]["SSN"] >= 7 and d["tables"]
    out2 = tmp_path / "rescrubbed.jsonl"
    assert cli("--home", home, "vault", "export", "ward@2", "--out", out2).code == 0
    assert not _leaks(out2.read_text()), _leaks(out2.read_text())
    old = cli("--home", home, "--json", "vault", "show", "ward@1").json
    new = cli("--home", home, "--json", "vault", "show", "ward@2").json
    assert new["records"] == old["records"] and new["splits"] == old["splits"] and new["pii_mode"] == "redact"
    assert not _leaks(json.dumps(new))

    lin = cli("--home", home, "--json", "lineage", "ward@2").json
    assert lin["lineage"]["parents"][0]["id"] == "ward@1" and lin["lineage"]["parents"][0]["role"] == "rescrub"
    assert lin["lineage"]["attrs"]["policy_before"]["mode"] == "flag" and lin["warnings"] == []
    tok_id = tok.json["id"]
    warned = cli("--home", home, "--json", "lineage", tok_id).json["warnings"]
    assert len(warned) == 1 and "ward@1" in warned[0] and "ward@2" in warned[0]
    assert any(tok_id in w for w in old["warnings"]) and new["warnings"] == []
    human = cli("--home", home, "lineage", tok_id)
    assert "warning:" in human.err and "less-scrubbed" in human.err
    # a tokenizer made from the re-scrubbed version is not warned about
    tok2 = cli("--home", home, "--json", "train", "tokenizer", "--dataset", "ward@2", "--vocab", "300").json["id"]
    assert cli("--home", home, "--json", "lineage", tok2).json["warnings"] == []

    # re-scrubbing under the very policy a version was scrubbed under would change nothing, and would mark what
    # was made from it as less scrubbed: refused, in one line, and nothing lands
    again = cli("--home", home, "vault", "ingest", "--rescrub", "ward@2")
    assert again.code == 2 and "same types and detectors" in again.err and len(again.err.strip().splitlines()) <= 2
    assert cli("--home", home, "--json", "lineage", tok2).json["warnings"] == []
    assert cli("--home", home, "--json", "vault", "show", "ward@3").code == 2


def test_rescrub_bad_input_is_one_line_and_writes_nothing(home, cli, tmp_path):
    f = tmp_path / "a.md"
    f.write_text("# A\n\nplain text\n")
    assert cli("--home", home, "vault", "ingest", f, "--dataset", "a").code == 0
    assert cli("--home", home, "vault", "ingest", f, "--dataset", "b").code == 0
    for args, words in ((["--rescrub", "a@1", f], "no PATHS"), (["--rescrub", "a@7"], "a@1"),
                        (["--rescrub", "a@1", "--pii", "flag"], "redact"),
                        (["--rescrub", "a@1", "--replace"], "--replace"),
                        (["--rescrub", "a@1", "--pii", "pseudonymize", "--dataset", "b"], "b exists"),
                        ([], "Missing argument 'PATHS...'"), ([f], "Missing option '--dataset'")):
        r = cli("--home", home, "vault", "ingest", *args)
        assert r.code == 2 and words in r.err, (args, r.err)
    assert [d["latest"] for d in cli("--home", home, "--json", "vault", "datasets").json["datasets"]] == ["a@1", "b@1"]


def test_the_site_policy_holds_for_fields_too(home, cli, tmp_path):
    from appliance.vault import pii

    f = tmp_path / f"visit {MAIL}.md"
    f.write_text(f"# Call {MAIL} about SSN {SSN}\n\nWrite to {MAIL}.\n")
    (home / pii.POLICY_FILE).write_text('keep = ["EMAIL"]\n')
    r = cli("--home", home, "--json", "vault", "ingest", f, "--dataset", "kept")
    assert r.code == 0, r.err
    rec = cli("--home", home, "--json", "vault", "record", "kept@1#0").json
    for value in (rec["text"], rec["title"], rec["source"]):
        assert MAIL in value and SSN not in value  # the e-mail is kept by policy, everywhere alike
    assert "[SSN]" in rec["title"]
    lineage = cli("--home", home, "--json", "lineage", "kept@1").json["lineage"]
    assert "EMAIL" not in lineage["attrs"]["pii_policy"]["types"]

    (home / pii.POLICY_FILE).write_text("keep = [\"NOPE\"]\n")
    bad = cli("--home", home, "vault", "ingest", f, "--dataset", "kept")
    assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1 and "NOPE" in bad.err
    assert cli("--home", home, "--json", "vault", "show", "kept").json["version"] == "kept@1"


def test_a_vault_from_before_reads_and_rescrubs(cli, tmp_path, monkeypatch):
    """A vault made before the report kept detectors and findings: read-only reads work as they did; the
    first writable open adds what is new, and its versions can be re-scrubbed."""
    from tests.test_migrate import FIXTURE_PASSPHRASE, fixture_home

    h = fixture_home(1, tmp_path)
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", FIXTURE_PASSPHRASE)
    show = cli("--home", h, "--json", "vault", "show", "site@1")
    assert show.code == 0, show.err
    assert all(r["detector"] is None for r in show.json["pii"]["by_detector"])
    review = cli("--home", h, "--json", "vault", "pii-review", "site@1")
    assert review.code == 0 and review.json["findings"] == [], review.err
    r = cli("--home", h, "--json", "vault", "ingest", "--rescrub", "site@1")
    assert r.code == 0, r.err
    assert r.json["version"] == "site@2" and r.json["policy_before"] == {"mode": "redact"}
    assert cli("--home", h, "--json", "vault", "check").json["ok"]


def test_a_warning_follows_the_data_not_past_a_rescrub(home, cli, tmp_path):
    """site@2 holds site@1's records: re-scrubbing site@1 warns about site@2 and what was made from it, until
    site@2 is re-scrubbed too; nothing made from a re-scrubbed version is warned about."""
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text(f"# A\n\nSeen by {WHO} about the pump house valve.\n" * 20)
    b.write_text("# B\n\nThe compressor was serviced and the valve replaced.\n" * 20)
    ok = lambda *args: cli("--home", home, "--json", *args)  # noqa: E731
    assert ok("vault", "ingest", a, "--dataset", "site", "--pii", "flag").code == 0  # site@1
    assert ok("vault", "ingest", b, "--dataset", "site", "--pii", "flag").code == 0  # site@2 = site@1 + b
    assert ok("vault", "ingest", "--rescrub", "site@1").json["version"] == "site@3"
    tok = ok("train", "tokenizer", "--dataset", "site@2", "--vocab", "300").json["id"]
    (w2,) = ok("vault", "show", "site@2").json["warnings"]
    assert "site@1" in w2 and "--rescrub site@2" in w2
    (wt,) = ok("lineage", tok).json["warnings"]
    assert "site@1" in wt and "site@3" in wt
    assert ok("vault", "show", "site@3").json["warnings"] == []
    assert ok("vault", "ingest", "--rescrub", "site@2").json["version"] == "site@4"
    assert ok("vault", "show", "site@4").json["warnings"] == []
    tok4 = ok("train", "tokenizer", "--dataset", "site@4", "--vocab", "300").json["id"]
    assert ok("lineage", tok4).json["warnings"] == []
    (w1,) = ok("vault", "show", "site@1").json["warnings"]
    assert tok in w1 and tok4 not in w1  # what was made from site@1's data, not from its re-scrubs


def test_table_cells_are_kept_for_review_like_text(home, tmp_path):
    """A finding in a table cell is reviewed in its row's record, in context, masked."""
    from appliance import api

    rows = "\n".join(f"{i},Derek Hollis,{SSN},pump {i}" for i in range(5))
    (tmp_path / "staff.csv").write_text(f"id,name,ssn,asset\n{rows}\n")
    with open_vault(home) as v:
        for mode in ("redact", "flag"):
            api.vault_ingest(v, [tmp_path / "staff.csv"], f"staff-{mode}", pii=mode, workers=1)
            d = api.vault_pii_review(v, f"staff-{mode}@1", limit=100)
            cells = [f for f in d["findings"] if f["source"].endswith("staff.csv") and f["field"] == "text"]
            assert {f["type"] for f in cells} == {"SSN", "PERSON"} and len(cells) == 10, d["findings"]
            assert all(f["id"].startswith(f"staff-{mode}@1#") for f in cells)
            assert any("ssn: »[SSN]«" in f["context"] for f in cells), cells
            assert not _leaks(json.dumps(d)), _leaks(json.dumps(d))


def test_the_mcp_tool_for_pii_review_is_the_api_call(attacked, cli):
    """One line over `api.agent_vault_pii_review`, which needs the records capability."""
    from appliance import api, mcp_server

    tools, calls = {}, []

    def tool(_doc):
        return lambda fn: tools.setdefault(fn.__name__, fn)

    mcp_server.read_tools(tool, lambda fn, **args: calls.append((fn, args)) or {})
    tools["vault_pii_review"]("ward@1", limit=3, type="SSN")
    assert calls == [(api.agent_vault_pii_review, {"ref": "ward@1", "limit": 3, "offset": 0, "type": "SSN",
                                                   "band": None, "file": None})]
    token = cli("--home", attacked, "--json", "grant", "--agent", "reader", "--caps", "read,records",
                "--hours", "1").json["token"]
    read_only = cli("--home", attacked, "--json", "grant", "--agent", "peek", "--caps", "read",
                    "--hours", "1").json["token"]
    agent = api.agent_open(attacked, PASSPHRASE, token)
    try:
        with agent.session(wait=30) as v:
            d = api.agent_vault_pii_review(v, token, "ward@1", limit=500)
            with pytest.raises(Exception, match="records"):
                api.agent_vault_pii_review(v, read_only, "ward@1")
    finally:
        agent.close()
    assert d["findings"] and "[SSN]" in json.dumps(d) and not _leaks(json.dumps(d))


def test_training_on_a_superseded_version_warns_once_and_goes_on(home, tmp_path, monkeypatch):
    """A run on data re-scrubbed since under a stricter policy says so in one line and keeps the line in its
    result; it is not refused (what the run does after the warning is stubbed here: no training needed)."""
    from appliance import api
    from appliance.train import run as train_run
    from appliance.train.config import load_recipe

    src = tmp_path / "notes"
    src.mkdir()
    for i in range(12):
        (src / f"n{i}.md").write_text(f"# Note {i}\n\nSeen by {WHO} about valve {i} of pump house {i % 3}.\n" * 5)

    class Stop(Exception):
        pass

    def stop(*_a, **_k):
        raise Stop

    monkeypatch.setattr(train_run, "_open_run", stop)  # right after the warning: the run would start here
    events = []
    with open_vault(home) as v:
        api.vault_ingest(v, [src], "site", pii="flag", workers=1)
        tok = api.train_tokenizer(v, "site@1", vocab=300)["id"]
        assert api.vault_rescrub(v, "site@1")["version"] == "site@2"
        recipe = load_recipe("tiny-dense", ["data.datasets=['site@1']", f"data.tokenizer={tok}", "train.eval_every=0"])
        with pytest.raises(Stop):
            train_run.run(v, recipe, on_event=lambda kind, d: events.append((kind, d)))
        again = train_run.less_scrubbed_warning(v, ["site@2"])
    (warning,) = [d["text"] for kind, d in events if kind == "warning"]
    assert warning.startswith("warning: ") and "site@1" in warning and "site@2" in warning and "\n" not in warning
    assert again == ""  # the re-scrubbed version itself is nothing to warn about


def test_names_found_in_a_text_are_looked_for_in_its_title_and_the_files_later_records(home, tmp_path):
    """A mail's subject is its record's title: the message's "Patient Margaret Okonkwo" makes "Okonkwo" a name
    there too, as the subject line in the text shows it. A file past 64 KiB is cut into records: the name its
    first piece introduced ("Patient Derek Hollis") is found alone in the next ("Hollis asked")."""
    from appliance import api

    mail = tmp_path / "in" / "reply.eml"
    mail.parent.mkdir()
    mail.write_text("From: ward4@example.org\nTo: ops@example.org\nSubject: RE: Okonkwo transfer\n"
                    "\nPatient Margaret Okonkwo moves to 4W today.\n")
    note = tmp_path / "in" / "notes.txt"  # a title with no separator in it: scrubbed as text is
    note.write_text("Patient Derek Hollis admitted.\n" + "Vitals within normal limits; plan unchanged.\n" * 1600
                    + "Hollis asked about discharge. hollis stable.\n")
    box = tmp_path / "in" / "ward.mbox"  # a mailbox's later messages
    box.write_text("From a@example.org Mon Jun  3 09:00:00 2024\nFrom: a@example.org\nSubject: admission\n\n"
                   "Patient Derek Hollis arrived.\n\nFrom b@example.org Mon Jun  3 10:00:00 2024\n"
                   "From: b@example.org\nSubject: update\n\nHollis settled in well.\n")
    with open_vault(home) as v:
        api.vault_ingest(v, [tmp_path / "in"], "notes", workers=1)
        rows = v.con.execute("SELECT r.title, b.text FROM version_records r JOIN blobs b ON b.hash = r.hash").fetchall()
    assert len(rows) >= 5  # the mail, the note in two pieces at least, the mailbox's two messages
    landed = json.dumps(rows)
    assert "Okonkwo" not in landed and "Hollis" not in landed and "hollis" not in landed, landed[-300:]
    assert "RE: [PERSON] transfer" in {t for t, _ in rows}


def test_strings_nested_in_a_tables_objects_and_lists_are_scrubbed(home, tmp_path):
    """A JSON Lines file's objects become nested columns: every string in them is scrubbed, in every batch, with
    its key as the column; a number in them that holds PII becomes null. The column keeps its type."""
    from appliance import api

    rows = [{"note": "Plan: continue.", "patient": {"name": "Hollis, Derek", "dob": "1930-04-12", "ssn": 123456789,
                                                    "contacts": [{"phone": "617-555-0199"}]}}] * 3000  # 2 batches
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open_vault(home) as v:
        r = api.vault_ingest(v, [tmp_path / "notes.jsonl"], "notes", workers=1)
        (table,) = r["tables"] if isinstance(r, dict) else r.tables
        cells = v.con.execute(f"SELECT patient FROM {table}").fetchall()
        kinds = v.con.execute(f"SELECT typeof(patient) FROM {table} LIMIT 1").fetchone()[0]
        texts = v.con.execute("SELECT b.text FROM version_records r JOIN blobs b ON b.hash = r.hash").fetchall()
    assert len(cells) == 3000 and kinds.startswith("STRUCT")
    landed = json.dumps([cells, texts], default=str)
    assert not _leaks(landed) and "1930-04-12" not in landed and "617-555" not in landed, landed[:400]
    assert cells[-1][0]["name"] == "[PERSON]" and cells[-1][0]["ssn"] is None


def test_a_fhir_patient_export_lands_without_its_names_and_ids(home, tmp_path):
    """FHIR Bulk Data NDJSON: a name's "family" and "given", its "text", an identifier's "value" and the birth
    date are read as what their keys say, though no key says "name" or "MRN" (they landed as they were)."""
    from appliance import api

    patient = {"resourceType": "Patient", "id": "p1",
               "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "00448812"}],
               "name": [{"use": "official", "family": "Okonkwo", "given": ["Ngozi", "Adaeze"],
                         "text": "Ngozi Okonkwo"}],
               "birthDate": "1945-03-12", "gender": "female"}
    (tmp_path / "Patient.ndjson").write_text(json.dumps(patient) + "\n")
    with open_vault(home) as v:
        r = api.vault_ingest(v, [tmp_path / "Patient.ndjson"], "fhir", workers=1)
        (table,) = r["tables"] if isinstance(r, dict) else r.tables
        row = v.con.execute(f"SELECT identifier, name, birthDate, gender FROM {table}").fetchone()
    landed = json.dumps(row, default=str)
    for value in ("Okonkwo", "Ngozi", "Adaeze", "00448812", "1945-03-12"):
        assert value not in landed, (value, landed)
    assert "official" in landed and "female" in landed and "urn:oid" in landed  # what says no one stays


def test_a_rescrub_of_a_flag_version_counts_a_tables_findings_once(home, tmp_path):
    """A table's findings are counted in its cells; its rows' records, whose text a flag version keeps with the
    values, were counted again by a re-scrub: the report said twice what an ingest says."""
    from appliance import api

    rows = "\n".join(f"{i},Derek Hollis,{SSN}" for i in range(3))
    (tmp_path / "staff.csv").write_text(f"id,name,ssn\n{rows}\n")
    with open_vault(home) as v:
        api.vault_ingest(v, [tmp_path / "staff.csv"], "flagged", pii="flag", workers=1)
        api.vault_ingest(v, [tmp_path / "staff.csv"], "plain", workers=1)
        again = api.vault_rescrub(v, "flagged@1")
        plain = api.vault_show(v, "plain@1")["pii"]["total"]
        assert again["pii"] == plain == {"PERSON": 3, "SSN": 3}, (again["pii"], plain)


def test_flag_mode_review_masks_names_the_file_gave_beyond_what_it_keeps(home, cli, tmp_path):
    """A name found from an earlier part of the file, more often than the review keeps findings of it (50 per
    file, type and detector), is masked in every context shown all the same."""
    f = tmp_path / "notes.txt"
    f.write_text("Patient Derek Hollis admitted.\n" + "Vitals within normal limits; plan unchanged.\n" * 1600
                 + "".join(f"Hollis asked about the pump {i}.\n" for i in range(81))
                 + f"Hollis gave SSN {SSN} at intake.\n")
    assert cli("--home", home, "vault", "ingest", f, "--dataset", "long", "--pii", "flag").code == 0
    d = cli("--home", home, "--json", "vault", "pii-review", "long@1", "--type", "ssn").json
    assert d["findings"] and "»[SSN]«" in d["findings"][0]["context"]
    assert not _leaks(json.dumps(d["findings"], ensure_ascii=False)), d["findings"][0]["context"]


def test_names_in_a_tables_record_fields_and_map_keys_are_scrubbed(home, tmp_path):
    """A JSON object's keys become a record column's field names, a Parquet map's keys are values: a name in
    either landed as it was ("scores": {"Derek Hollis": 5})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from appliance import api

    (tmp_path / "scores.jsonl").write_text(json.dumps({"scores": {"Derek Hollis": 5, "Ana Okafor": 3}}) + "\n")
    pq.write_table(pa.table({"contacts": pa.array([[("Derek Hollis", "617-555-0199"), ("Ana Okafor", "x")]],
                                                  type=pa.map_(pa.string(), pa.string()))}), tmp_path / "c.parquet")
    with open_vault(home) as v:
        r = api.vault_ingest(v, [tmp_path], "nested", workers=1)
        cells = [v.con.execute(f"SELECT * FROM {t}").fetchall() for t in r["tables"]]
        texts = v.con.execute("SELECT b.text FROM version_records r JOIN blobs b ON b.hash = r.hash").fetchall()
    landed = json.dumps([cells, texts], default=str)
    assert not _leaks(landed) and "Okafor" not in landed and "617-555" not in landed, landed
    assert "[PERSON]_2" in landed  # two keys that land as one placeholder stay two keys


def test_a_version_holding_an_earlier_flag_versions_records_can_be_rescrubbed(home, tmp_path):
    """An ingest on top of a flag version keeps that version's records as they were: re-scrubbing it under the
    policy of its own last ingest changes them, and is not refused as changing nothing."""
    from appliance import api

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "a.txt").write_text(f"Patient Derek Hollis, SSN {SSN}.\n")
    (tmp_path / "b" / "b.txt").write_text("Plain text.\n")
    with open_vault(home) as v:
        api.vault_ingest(v, [tmp_path / "a"], "site", pii="flag", workers=1)
        api.vault_ingest(v, [tmp_path / "b"], "site", workers=1)
        r = api.vault_rescrub(v, "site@2")
        texts = v.con.execute("SELECT b.text FROM version_records r JOIN blobs b ON b.hash = r.hash "
                              "JOIN versions x ON x.vid = r.vid WHERE x.name = 'site' AND x.n = 3").fetchall()
    assert r["version"] == "site@3" and not _leaks(json.dumps(texts)), texts


def test_a_name_of_several_words_is_found_whole_in_the_heading_and_the_title():
    """"Nguyen Thi Lan" found in the text was looked for word by word, and "Lan" (a word too) stayed in the
    heading and the title: "Discharge summary - [PERSON] [PERSON] Lan"."""
    from appliance.vault.fields import FieldScrubber, scrub_record
    from appliance.vault.readers import Record

    rec = Record("text", "a.md", "# Discharge summary - Nguyen Thi Lan\n\nPatient Nguyen Thi Lan was discharged.",
                 None, None, "Discharge summary - Nguyen Thi Lan", {})
    scrub_record(FieldScrubber("redact", b"k" * 32), rec)
    assert rec.title == "Discharge summary - [PERSON]"
    assert rec.text == "# Discharge summary - [PERSON]\n\nPatient [PERSON] was discharged."


def test_a_rescrub_remakes_a_tables_row_records_from_its_cells(home, tmp_path):
    """A table row's record was scrubbed again as prose, where the rules that read a cell with its column
    ("signed_by", "given") never reach it: a re-scrub of a flag version left "signed_by: Okafor" in the records
    while the data table was clean. The records are made again from the re-scrubbed cells, as ingest makes them."""
    from appliance import api

    (tmp_path / "orders.csv").write_text("id,signed_by,given,note\n1,Okafor,Ngozi,stable\n2,Whitfield,Jamal,seen\n")
    with open_vault(home) as v:
        api.vault_ingest(v, [tmp_path / "orders.csv"], "orders", pii="flag", workers=1)
        again = api.vault_rescrub(v, "orders@1")
        texts = [t for (t,) in v.con.execute(
            "SELECT b.text FROM version_records r JOIN versions x ON x.vid = r.vid JOIN blobs b ON b.hash = r.hash "
            "WHERE x.name = 'orders' AND x.n = 2 ORDER BY r.ord").fetchall()]
        (table,) = again["tables"]
        cells = v.con.execute(f"SELECT signed_by, given, note FROM {table} ORDER BY id").fetchall()
    assert len(texts) == 2 and cells == [("[PERSON]", "[PERSON]", "stable"), ("[PERSON]", "[PERSON]", "seen")]
    for name in ("Okafor", "Ngozi", "Whitfield", "Jamal"):
        assert not any(name in t for t in texts), texts
    assert "signed_by: [PERSON]" in texts[0] and "note: stable" in texts[0]
