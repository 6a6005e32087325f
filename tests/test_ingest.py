"""Ingest of every kind, versions, duplicates, bad input and a killed ingest."""

import json
import os
import signal
import subprocess
import time

from tests.conftest import PY, open_vault, python_env


def _records(v, ref):
    from appliance.vault.versions import iter_records

    return list(iter_records(v.con, ref))


def test_every_kind_lands(filled_home):
    with open_vault(filled_home, read_only=True) as v:
        recs = _records(v, "corpus@1")
    kinds = {r["kind"] for r in recs}
    assert kinds == {"text", "email", "code", "table", "pdf", "docx"}
    mails = [r for r in recs if r["kind"] == "email"]
    assert len(mails) == 100  # 40 .eml files and an mbox of 60
    assert any("--- attachment: checklist.txt ---" in r["text"] for r in mails)
    assert all(r["text"].startswith("From: ") for r in mails)
    pdf = next(r for r in recs if r["kind"] == "pdf")
    assert "Safety bulletin: KESTREL telemetry bus" in pdf["text"] and pdf["meta"]["pages"] == 6
    docx = next(r for r in recs if r["kind"] == "docx")
    assert "FROSTLINE calibration procedure" in docx["text"] and "Interval | every 14 days" in docx["text"]


def test_repository_structure_is_kept(filled_home):
    with open_vault(filled_home, read_only=True) as v:
        code = {r["path"]: r for r in _records(v, "corpus@1") if r["kind"] == "code"}
        sources = {s["path"].split("kestrel-tools/")[-1]: s for s in
                   __import__("appliance.vault.versions", fromlist=["show"]).show(v.con, "corpus@1")["sources"]
                   if "kestrel-tools" in s["path"]}
    assert set(code) == {"README.md", "src/kestrel/__init__.py", "src/kestrel/frames.py",
                         "src/kestrel/frostline.py", "native/qloop.c"}
    assert code["native/qloop.c"]["language"] == "c" and code["src/kestrel/frames.py"]["language"] == "python"
    assert code["README.md"]["meta"]["repo"] == "kestrel-tools"
    # .gitignore'd files never appear; vendored dirs and binaries are reported as skipped
    assert not any(k.startswith(("debug.log", "secrets")) for k in sources)
    assert sources["vendor"]["status"] == "skipped" and "vendored" in sources["vendor"]["reason"]
    assert sources["assets/logo.png"]["status"] == "skipped" and sources["assets/logo.png"]["reason"] == "binary file"


def test_tables_are_real_tables_and_scrubbed(filled_home):
    with open_vault(filled_home, read_only=True) as v:
        c = v.con
        assert c.execute("SELECT count(*) FROM data.t1_equipment").fetchone()[0] == 240
        assert c.execute("SELECT count(*) FROM data.t1_inspections").fetchone()[0] == 200
        assert c.execute("SELECT count(*) FROM data.t1_handbook_qa").fetchone()[0] == 90
        owners = {o for (o,) in c.execute("SELECT DISTINCT owner_email FROM data.t1_equipment").fetchall()}
        assert owners == {"[EMAIL]"}
        row = c.execute("SELECT patient_name, date_of_birth, mrn, reason FROM data.t1_clinic_visits LIMIT 1").fetchone()
        assert row[:3] == ("[PERSON]", "[DOB]", "[MRN]") and row[3]
        risk = dict(c.execute("SELECT risk_class, count(*) FROM data.t1_equipment GROUP BY ALL").fetchall())
        assert set(risk) <= {"low", "medium", "high", "critical"} and sum(risk.values()) == 240
        text = _records(v, "corpus@1")
    rows = [r for r in text if r["kind"] == "table" and r["path"] == "t1_equipment"]
    assert len(rows) == 240 and "risk_class: " in rows[0]["text"] and "[EMAIL]" in rows[0]["text"]


def test_no_raw_pii_in_the_vault(filled_home):
    with open_vault(filled_home, read_only=True) as v:
        blob = "\n".join(t for (t,) in v.con.execute("SELECT text FROM blobs").fetchall())
    for raw in ("@halvorsen-dyn.example", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "Ingrid Lindqvist"):
        assert raw not in blob, raw


def test_versions_are_immutable_and_chained(home, cli, samples):
    r1 = cli("--home", home, "--json", "vault", "ingest", samples / "handbook", "--dataset", "hb").json
    assert r1["version"] == "hb@1" and r1["duplicates"] == 1 and r1["parent"] is None
    r2 = cli("--home", home, "--json", "vault", "ingest", samples / "documents", "--dataset", "hb").json
    assert r2["version"] == "hb@2" and r2["parent"] == "hb@1" and r2["records"] == r1["records"] + 2
    r3 = cli("--home", home, "--json", "vault", "ingest", samples / "handbook", "--dataset", "hb").json
    assert r3["new_records"] == 0 and r3["duplicates"] == 21 and r3["records"] == r2["records"]
    assert r3["content_hash"] == r2["content_hash"]  # same records, same content
    show1 = cli("--home", home, "--json", "vault", "show", "hb@1").json
    assert show1["content_hash"] == r1["content_hash"] and show1["records"] == r1["records"]
    r4 = cli("--home", home, "--json", "vault", "ingest", samples / "documents", "--dataset", "hb", "--replace").json
    assert r4["version"] == "hb@4" and r4["parent"] is None and r4["records"] == 2
    assert cli("--home", home, "vault", "check").code == 0
    tree = cli("--home", home, "--json", "lineage", "hb@3").json["lineage"]
    assert tree["parents"][0]["id"] == "hb@2" and tree["parents"][0]["parents"][0]["id"] == "hb@1"


def test_split_is_deterministic_by_content(home, cli, samples):
    cli("--home", home, "vault", "ingest", samples / "mail", "--dataset", "a")
    cli("--home", home, "vault", "ingest", samples / "mail", "--dataset", "b")
    with open_vault(home, read_only=True) as v:
        a = {(r["hash"], r["split"]) for r in _records(v, "a@1")}
        b = {(r["hash"], r["split"]) for r in _records(v, "b@1")}
        info = __import__("appliance.vault.versions", fromlist=["show"]).show(v.con, "a@1")
    assert a == b
    assert 0 < info["splits"]["validation"] < info["splits"]["train"]


def test_corrupt_files_give_a_partial_version(home, cli, tmp_path, samples):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "good.md").write_text("# good\nthe tarn valve isolates the secondary circuit\n")
    (src / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (src / "broken.docx").write_bytes(b"PK\x03\x04 not a zip")
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (src / "empty.md").write_text("")
    (src / "bad.parquet").write_bytes(b"PAR1 truncated garbage")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    r = cli("--home", home, "--json", "vault", "ingest", src, "--dataset", "mixed")
    assert r.code == 3, r.err
    d = r.json
    assert d["ok"] is True and d["partial"] is True and d["version"] == "mixed@1" and d["records"] == 1
    failed = {os.path.basename(f["path"]): f["reason"] for f in d["failed"]}
    assert set(failed) == {"broken.pdf", "broken.docx", "latin1.txt", "empty.md", "bad.parquet"}
    assert "not UTF-8" in failed["latin1.txt"] and "PDF" in failed["broken.pdf"]
    assert {os.path.basename(s["path"]) for s in d["skipped"]} == {"image.png"}
    assert "partial: 5 file(s) could not be read" in r.err
    assert cli("--home", home, "vault", "check").code == 0
    with open_vault(home, read_only=True) as v:  # a failed table leaves no table behind
        sql = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'data'"
        tables = {t for (t,) in v.con.execute(sql).fetchall()}
    assert tables == set()


def test_nothing_readable_is_an_error_and_no_version(home, cli, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0\1\2")
    r = cli("--home", home, "vault", "ingest", tmp_path / "x.bin", "--dataset", "none")
    assert r.code == 1 and r.err.startswith("error: nothing ingested")
    r = cli("--home", home, "vault", "ingest", tmp_path / "missing", "--dataset", "none")
    assert r.code == 1 and "no such file" in r.err
    assert cli("--home", home, "--json", "vault", "datasets").json["datasets"] == []


def test_all_inputs_failing_adds_no_version(home, cli, samples, tmp_path):
    assert cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb").code == 0
    r = cli("--home", home, "vault", "ingest", tmp_path / "typo.md", "--dataset", "hb")
    assert r.code == 1 and "nothing ingested" in r.err
    assert [d["latest"] for d in cli("--home", home, "--json", "vault", "datasets").json["datasets"]] == ["hb@1"]
    r = cli("--home", home, "vault", "show", "hb@²")
    assert r.code == 2 and "bad version" in r.err


def test_a_file_failing_half_way_leaves_no_records(home, tmp_path):
    """9 MB of text (a batch reaches the database) and then a bad byte: the file's records all go."""
    from appliance.vault.ingest import ingest

    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.md").write_text("# fine\nthe Pike relay switches the station to the backup feeder\n")
    with open(src / "bad.md", "wb") as f:
        for i in range(9 * 1024):
            f.write(f"line {i} ".encode() * 100 + b"\n")
        f.write(b"\xff\xfe broken tail\n")
    with open_vault(home) as v:
        r = ingest(v, [src], "half", workers=1)
        assert r.records == 1 and [p.endswith("bad.md") for p, _ in r.failed] == [True]
        blobs = v.con.execute("SELECT count(*) FROM blobs").fetchone()[0]
        assert blobs == 1  # nothing of bad.md stays behind
        assert v.check().ok


def test_unfinished_ingest_tables_are_dropped(home):
    with open_vault(home) as v:
        vid = v.con.execute("SELECT nextval('version_vid')").fetchone()[0]
        v.con.execute("INSERT INTO versions (vid, name, status, created) VALUES (?, 'x', 'pending', now())", [vid])
        v.con.execute(f'CREATE TABLE data."t{vid}_people" AS SELECT 1 AS a')
    with open_vault(home) as v:  # the next writable open discards it
        sql = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'data'"
        assert v.con.execute(sql).fetchall() == []
        assert v.con.execute("SELECT count(*) FROM versions").fetchone()[0] == 0


def test_pii_modes_through_ingest(home, cli, tmp_path):
    f = tmp_path / "p.md"
    f.write_text("Contact jane@example.com.\nAgain: jane@example.com\n")
    for mode in ("pseudonymize", "flag"):
        assert cli("--home", home, "vault", "ingest", f, "--dataset", mode, "--pii", mode).code == 0
    with open_vault(home, read_only=True) as v:
        (p,) = _records(v, "pseudonymize@1")
        (fl,) = _records(v, "flag@1")
        report = __import__("appliance.vault.versions", fromlist=["show"]).show(v.con, "flag@1")["pii"]
    tokens = [w.rstrip(".") for w in p["text"].split() if w.startswith("[EMAIL_")]
    assert len(tokens) == 2 and tokens[0] == tokens[1]
    assert "jane@example.com" in fl["text"] and fl["meta"]["pii"] == {"EMAIL": 2}
    assert report["total"] == {"EMAIL": 2} and list(report["per_file"].values()) == [{"EMAIL": 2}]


def test_killed_ingest_leaves_no_version(home, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    line = "The FROSTLINE calibration aligns the cryogenic sensors against the reference bath. "
    for i in range(16):  # about 50 MB: ingest takes several seconds, the first batch lands in one
        (big / f"doc{i:03d}.md").write_text("".join(f"{line}{i}.{j}\n" for j in range(35000)))
    env = python_env()
    p = subprocess.Popen([PY, "-m", "appliance", "--home", str(home), "vault", "ingest", str(big), "--dataset", "k"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    with_records = False
    while time.time() < deadline and p.poll() is None:  # wait until records are being written
        time.sleep(0.3)
        wal = home / "vault.duckdb.wal"
        if wal.exists() and wal.stat().st_size > 4 << 20:
            with_records = True
            break
    assert p.poll() is None, "ingest finished before it could be killed; make the input larger"
    assert with_records
    workers = _descendants(p.pid)  # the fork server and the scan workers it forked
    assert len(workers) >= 3, "the ingest runs its scanners in worker processes, forked from a fork server"
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{w}") for w in workers):  # they die with it, not wait for work forever
        assert time.time() < deadline, f"workers {workers} outlived the killed ingest"
        time.sleep(0.1)
    with open_vault(home) as v:  # opens fine, and the unfinished version is gone
        assert v.con.execute("SELECT count(*) FROM versions").fetchone()[0] == 0
        assert v.con.execute("SELECT count(*) FROM version_records").fetchone()[0] == 0
        assert v.con.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
        assert v.check().ok
        actions = [a for (a,) in v.con.execute("SELECT action FROM audit ORDER BY seq").fetchall()]
    assert actions[-1] == "vault.ingest.discarded"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return out


def test_show_reports_sources_and_pii(filled_home, cli):
    d = cli("--home", filled_home, "--json", "vault", "show", "corpus").json
    assert d["version"] == "corpus@1" and d["pii_mode"] == "redact"
    assert d["pii"]["total"]["EMAIL"] > 100 and d["pii"]["total"]["CARD"] > 0
    per_file = d["pii"]["per_file"]
    assert any(p.endswith("equipment.csv") for p in per_file)
    assert all(len(s["sha256"]) == 64 for s in d["sources"] if s["status"] == "ok")
    assert json.dumps(d).count("@halvorsen-dyn.example") == 0  # the report holds counts, never values


def test_text_reader_streams(tmp_path):
    """A 48 MB file is read in bounded pieces: Python's peak allocation stays a few MB."""
    import tracemalloc

    from appliance.vault.readers import MAX_RECORD_CHARS
    from appliance.vault.readers.text import read_text

    f = tmp_path / "big.md"
    line = "The Osprey sampler takes water samples from the outfall every 4 hours.\n"
    with open(f, "w") as out:
        for _ in range(48 * (1 << 20) // len(line)):
            out.write(line)
    tracemalloc.start()
    n = total = 0
    for rec in read_text(f):
        assert len(rec.text) <= MAX_RECORD_CHARS and rec.text.endswith("\n")
        n, total = n + 1, total + len(rec.text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == f.stat().st_size and n >= 48 * (1 << 20) // MAX_RECORD_CHARS
    assert peak < 8 << 20, peak  # reads 1 MB at a time; a whole-file read would allocate over 48 MB


def test_parallel_ingest_matches_serial(home, samples, tmp_path, monkeypatch):
    """Worker processes read and scrub; the version is identical to a one-process ingest."""
    import appliance.vault.ingest as ing

    monkeypatch.setattr(ing, "POOL_MIN_BYTES", 0)  # use the pool even for the small sample corpus
    monkeypatch.setattr(ing, "SMALL_FILE", 20_000)  # and send some files through the batch path
    monkeypatch.setattr(ing, "TABLE_BYTES", 20_000)  # and two tables back from the workers (the Parquet file
    # expands six-fold), read here instead; three stay with the workers
    (samples.parent / "bad").mkdir(exist_ok=True)
    broken = samples.parent / "bad" / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 nope")
    bad_table = samples.parent / "bad" / "ragged.jsonl"  # read by DuckDB in a worker, and refused there
    bad_table.write_text('{"a": 1}\n{"a": \n')
    with open_vault(home) as v:
        serial = ing.ingest(v, [samples, broken, bad_table], "serial", workers=1)
        parallel = ing.ingest(v, [samples, broken, bad_table], "parallel", workers=2)
        assert serial.tables and len(parallel.tables) == len(serial.tables)
        for a, b in zip(serial.tables, parallel.tables):  # tables are read and scrubbed by workers, written here
            assert v.con.execute(f"SELECT * FROM {a} ORDER BY ALL").fetchall() == \
                v.con.execute(f"SELECT * FROM {b} ORDER BY ALL").fetchall()
        kept = [v.con.execute("SELECT t.source, t.rows, t.columns FROM version_tables t JOIN versions USING (vid) "
                              "WHERE versions.name = ? ORDER BY t.source", [name]).fetchall()
                for name in ("serial", "parallel")]
        assert kept[0] == kept[1] and kept[0]
        findings = [v.con.execute("SELECT f.ord, f.source, f.field, f.type, f.detector, f.score, f.pos, f.len "
                                  "FROM version_pii_findings f JOIN versions USING (vid) WHERE versions.name = ? "
                                  "ORDER BY ALL", [name]).fetchall() for name in ("serial", "parallel")]
        assert findings[0] == findings[1] and findings[0]
    assert parallel.content_hash == serial.content_hash and parallel.records == serial.records
    assert parallel.pii == serial.pii and parallel.duplicates == serial.duplicates
    assert [p for p, _ in parallel.failed] == [p for p, _ in serial.failed] == [str(broken), str(bad_table)]
    assert [r for _, r in parallel.failed] == [r for _, r in serial.failed]
    assert sorted(parallel.skipped) == sorted(serial.skipped)


def test_parallel_rescrub_matches_serial(home, samples, monkeypatch):
    """A re-scrub scrubs its records in ingest's worker processes; the version is what one process makes."""
    import appliance.vault.ingest as ing
    from appliance.vault.rescrub import rescrub

    monkeypatch.setattr(ing, "POOL_MIN_BYTES", 0)  # the pool even for the small sample corpus
    monkeypatch.setattr(ing, "SCAN_BATCH_CHARS", 4000)  # in many batches, several in flight at once
    with open_vault(home) as v:
        ing.ingest(v, [samples], "kept", pii_mode="flag", workers=1)  # flag keeps what it finds: found again
        serial = rescrub(v, "kept@1", dataset="serial", workers=1)
        parallel = rescrub(v, "kept@1", dataset="parallel", workers=2)
        found = [[v.con.execute(f"SELECT {cols} FROM {table} f JOIN versions USING (vid) WHERE versions.name = ? "
                                "ORDER BY ALL", [name]).fetchall() for name in ("serial", "parallel")]
                 for table, cols in (("version_pii_findings", "f.ord, f.source, f.field, f.type, f.detector, f.pos"),
                                     ("version_pii", "f.path, f.type, f.count, f.detector, f.band"),
                                     ("version_records", "f.ord, f.hash, f.source, f.title, f.split"))]
    for a, b in found:
        assert a == b and a
    assert serial["pii"]["PERSON"] > 0 and serial["pii"] == parallel["pii"]
    assert serial["content_hash"] == parallel["content_hash"] and serial["records"] == parallel["records"]


def _mail_both_ways(raw: bytes, tmp_path, name="m.eml"):
    """(records of `read_eml`, records the email package's parse gives, whether the plain path took it)."""
    import email
    import io

    from appliance.vault.readers import email as mail

    p = tmp_path / name
    p.write_bytes(raw)
    slow = list(mail._records(email.message_from_binary_file(io.BytesIO(raw)), str(p), None))
    return list(mail.read_eml(p)), slow, mail._plain(raw) is not None


def _mbox_both_ways(path):
    import email

    from appliance.vault.readers import email as mail

    with open(path, "rb") as f:
        slow = [r for n, raw in enumerate(mail._mbox_messages(f), 1)
                for r in mail._records(email.message_from_bytes(raw), str(path), f"message {n}")]
    return list(mail.read_mbox(path)), slow


def test_plain_mail_path_matches_the_email_package(tmp_path):
    """Every sample mail (several seeds), read by the plain path where it can, is the record the email package
    gives; most sample mail takes the plain path."""
    from appliance.samples import generate
    from appliance.vault.readers import email as mail

    plain = total = 0
    for seed in range(3):
        generate(tmp_path / f"s{seed}", seed)
        for p in sorted((tmp_path / f"s{seed}").rglob("*.eml")):
            fast, slow, took = _mail_both_ways(p.read_bytes(), tmp_path)
            assert fast == slow, p
            plain, total = plain + took, total + 1
        for p in sorted((tmp_path / f"s{seed}").rglob("*.mbox")):
            fast, slow = _mbox_both_ways(p)
            assert fast == slow and len(fast) >= 60
            with open(p, "rb") as f:
                plain += sum(mail._plain(raw) is not None for raw in mail._mbox_messages(f))
    assert total >= 120 and plain > total


_HEAD = b"From: Ana Okafor <ana.okafor@site.example>\nTo: Derek Hollis <d@site.example>, ops@site.example\n"


def test_plain_mail_path_takes_only_plain_mail(tmp_path):
    """Plain cases take the fast path and match; folded and encoded headers, multipart, base64, other charsets,
    attachments, CR line ends and non-ASCII headers go to the email package, and match too (it reads them)."""
    plain_cases = [
        _HEAD + b"Subject: Hello\n\nBody with caf\xc3\xa9.\n",
        _HEAD + b"Subject: QP\nContent-Type: text/plain; charset=\"utf-8\"\nContent-Transfer-Encoding: "
        b"quoted-printable\n\nLine one is long and cut=\nhere, caf=C3=A9 =3D ok=\n",
        _HEAD + b"Subject: ascii\nContent-Type: TEXT/PLAIN; Charset=US-ASCII\nContent-Transfer-Encoding: 7bit\n\n"
        b"Bytes \xff kept as replacement.\n",
        _HEAD + b"Cc: \nSubject:   spaced  \t\nX-Empty:\nSubject: second ignored\n\n\n\nBody after blank lines\n\n",
        b"To: \"Okafor, Ana\" <a@x.example>, (comment) b@y.example, Dr. J. Smith <j@z.example>\nSubject: s\n\nb\n",
        _HEAD + b"Subject: no body\n\n",
    ]
    slow_cases = [
        _HEAD + b"Subject: folded\n  over two lines\n\nBody\n",
        _HEAD + b"Subject: =?utf-8?q?Lab_results_for_J=C3=B6rg?=\n\nBody\n",
        _HEAD + b"Subject: b64\nContent-Transfer-Encoding: base64\n\nSGVsbG8gQW5hIE9rYWZvcg==\n",
        _HEAD + b"Subject: latin\nContent-Type: text/plain; charset=iso-8859-1\n\nCaf\xe9\n",
        _HEAD + b"Subject: html\nContent-Type: text/html\n\n<p>Hi <b>Ana</b></p>\n",
        _HEAD + b"Subject: crlf\r\n\r\nBody\r\n",
        _HEAD + b"Subject: caf\xc3\xa9\n\nBody\n",
        _HEAD + b"Subject: att\nContent-Disposition: attachment; filename=\"notes.txt\"\n\nNotes\n",
        _HEAD + b"Subject: qp with space\nContent-Transfer-Encoding: quoted-printable \n\nA=3DB\n",
        b"From someone@x Mon Jan  1 00:00:00 2024\n" + _HEAD + b"Subject: unix from\n\nBody\n",
        _HEAD + b"Subject: mp\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"XX\"\n\n--XX\n"
        b"Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\nHi =3D Ana\n--XX\n"
        b"Content-Type: text/plain\nContent-Disposition: attachment; filename=\"a.txt\"\n\nSSN 123-45-6789\n--XX--\n",
        _HEAD + b"Subject: no blank line, headers only\n",
    ]
    for raw in plain_cases + slow_cases:
        fast, slow, took = _mail_both_ways(raw, tmp_path)
        assert fast == slow, raw
        assert took == (raw in plain_cases), raw
    fast, _, _ = _mail_both_ways(plain_cases[1], tmp_path)
    assert "cuthere, café = ok" in fast[0].text.replace("\n", "")
    assert fast[0].name_hints == ("Ana Okafor", "Derek Hollis")
    mbox = tmp_path / "a.mbox"
    mbox.write_bytes(b"".join(b"From x@y Mon Jan  1 00:00:00 2024\n" + raw + b"\n" for raw in plain_cases + slow_cases))
    fast, slow = _mbox_both_ways(mbox)
    assert fast == slow and len(fast) == len(plain_cases) + len(slow_cases) + 1  # its "From " line splits too


def _worker_state() -> tuple[int, bool]:
    import sys

    from appliance.vault import pii_names

    return os.getppid(), pii_names.scorer.cache_info().currsize == 1 and "duckdb" not in sys.modules


def test_scan_workers_are_forked_with_the_scanner_loaded_not_from_the_ingest_process():
    """Workers come from a fork server that loaded the scanner and its name lists once: not forked from the
    ingest process, which holds DuckDB's threads, and not each loading the lists again."""
    import duckdb

    from appliance.vault.scan import pool

    con = duckdb.connect()  # as in the ingest process: DuckDB's threads are running here
    con.execute("SELECT count(*) FROM range(1000000)").fetchone()
    with pool(2) as ex:
        states = [f.result() for f in [ex.submit(_worker_state) for _ in range(4)]]
    con.close()
    assert all(parent != os.getpid() for parent, _ in states)  # forked from the server, not from here
    assert all(loaded for _, loaded in states), "each worker starts with the name lists loaded, no DuckDB"


def test_a_scan_worker_that_dies_is_one_clear_error():
    import pytest

    from appliance.errors import IngestError
    from appliance.vault.ingest import Pipeline

    pipe = Pipeline(2)
    try:
        list(pipe.submit("records", None, os._exit, 1))  # as the kernel's OOM killer would end it
        with pytest.raises(IngestError) as e:
            list(pipe.drain())
    finally:
        pipe.close()
    assert "scan worker process ended" in e.value.message and "--workers 1" in e.value.hint


def test_a_worker_gives_back_a_table_that_expands_past_what_it_holds(samples, tmp_path):
    """A small file can hold rows that expand a great deal (compressed Parquet): a worker holds a table whole
    only up to a limit, and gives back one that grows past it (ingest then streams it into the vault itself);
    one it cannot read goes back too, for the ingest process to report."""
    import shutil

    from appliance.vault.readers.detect import plan
    from appliance.vault.scan import scan_table

    src = next(p for p in sorted((samples / "tables").iterdir()) if p.suffix == ".csv")
    shutil.copy(src, tmp_path / src.name)
    table = next(i for i in plan([tmp_path]) if i.kind == "table")
    rows, (counts, landed) = scan_table(table, "t1_x", "redact", b"k" * 32, None, 64 << 20)
    assert rows.num_rows == len(landed) > 1 and all(row[1] == "t1_x" for row in landed)
    assert scan_table(table, "t1_x", "redact", b"k" * 32, None, rows.nbytes // 2) is None
    table.path.write_text("")  # empty now: "table has no rows", which the ingest process says
    assert scan_table(table, "t1_x", "redact", b"k" * 32, None, 64 << 20) is None


def test_a_wide_table_is_rendered_one_row_at_a_time(tmp_path):
    """Each row's record repeats every column's name: 200 columns of 1,000-character names make a 0.4 MB file
    whose 2,048 rows are 400 MB as records. A worker gives the table back once the rows it renders pass its
    limit, and the ingest process, which then streams it, holds one row's record at a time."""
    import tracemalloc
    from collections import Counter

    import duckdb

    from appliance.vault.fields import FieldScrubber
    from appliance.vault.readers.detect import plan
    from appliance.vault.readers.tables import ingest_table
    from appliance.vault.scan import scan_table

    p = tmp_path / "wide.csv"
    with open(p, "w") as f:
        f.write(",".join(f"c{i:03d}" + "x" * 1000 for i in range(200)) + "\n")
        f.writelines(f"{r}" + "," * 199 + "\n" for r in range(2048))
    item = next(i for i in plan([p]) if i.kind == "table")
    tracemalloc.start()
    try:
        assert scan_table(item, "t1_wide", "redact", b"k" * 32, None, 16 << 20) is None
        worker_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        con = duckdb.connect()
        con.execute("ATTACH ':memory:' AS vault; USE vault; CREATE SCHEMA data")
        fs = FieldScrubber("redact", b"k" * 32)
        n = sum(1 for _ in ingest_table(con, item.path, "t1_wide", fs.cell, Counter(), item.ident))
        here_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 2048
    assert worker_peak < 64 << 20, worker_peak  # a whole batch of records would be 400 MB
    assert here_peak < 64 << 20, here_peak
