"""The vault is standard DuckDB encryption, and no plaintext of vault data reaches the disk."""

import os
import subprocess
import tempfile
from pathlib import Path

import duckdb
import pytest

from tests.conftest import PY, artifact, open_vault, python_env

MARKER = "ZEBRA-QUOKKA-7781-plaintext-marker"


def test_plain_duckdb_needs_the_data_key(filled_home):
    with open_vault(filled_home, read_only=True) as v:
        key = v.secrets.duckdb_key
        want = v.con.execute("SELECT count(*) FROM blobs").fetchone()[0]
    db = str(filled_home / "vault.duckdb")
    plain = duckdb.connect()  # no extension loaded: DuckDB's own read-only crypto
    with pytest.raises(duckdb.Error, match="without a key|encrypt"):
        plain.execute(f"ATTACH '{db}' AS v (READ_ONLY)")
    with pytest.raises(duckdb.Error):
        plain.execute(f"ATTACH '{db}' AS w (ENCRYPTION_KEY '{'00' * 32}', READ_ONLY)")
    plain.execute(f"ATTACH '{db}' AS x (ENCRYPTION_KEY '{key}', READ_ONLY)")
    assert plain.execute("SELECT count(*) FROM x.blobs").fetchone()[0] == want


def test_connection_settings(filled_home):
    with open_vault(filled_home, read_only=True) as v:
        get = lambda name: v.con.execute(f"SELECT current_setting('{name}')").fetchone()[0]  # noqa: E731
        assert get("temp_file_encryption") is True
        assert get("autoinstall_known_extensions") is False
        assert get("autoload_known_extensions") is False
        assert get("allow_unsigned_extensions") is False
        assert Path(get("temp_directory")).resolve() == (filled_home / "tmp").resolve()
        loaded = v.con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()
        assert loaded == (True,)


def _grep(roots, needle: bytes) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    with open(p, "rb") as f:
                        if needle in f.read():
                            hits.append(p)
                except OSError:
                    pass
    return hits


def test_no_plaintext_lands_on_disk(tmp_path):
    """Ingest text, mail, a PDF, a DOCX and a table carrying a marker; grep home and temp dirs for it."""
    from appliance.samples import write_pdf

    src = tmp_path / "src"
    src.mkdir()
    (src / "note.md").write_text(f"# note\n{MARKER} in a markdown file\n" * 50)
    (src / "table.csv").write_text("id,text\n" + "".join(f"{i},{MARKER} row {i}\n" for i in range(300)))
    (src / "mail.eml").write_text(f"From: a@b.example\nSubject: x\n\n{MARKER} in mail\n")
    write_pdf(src / "doc.pdf", [[f"{MARKER} in a pdf"]], "t")
    import docx

    d = docx.Document()
    d.add_paragraph(f"{MARKER} in a docx")
    d.save(str(src / "doc.docx"))
    home = tmp_path / "home"
    tmpdir = tmp_path / "proc-tmp"
    tmpdir.mkdir()
    env = python_env() | {"TMPDIR": str(tmpdir)}
    code = ("import sys; from appliance.cli import main; main(sys.argv[1:])")
    for args in (["--home", str(home), "init"],
                 ["--home", str(home), "vault", "ingest", str(src), "--dataset", "m", "--pii", "off"],
                 ["--home", str(home), "vault", "sql", "SELECT text FROM blobs ORDER BY text"]):
        r = subprocess.run([PY, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    needle = MARKER.encode()
    assert _grep([home, tmpdir], needle) == []
    assert _grep([home], MARKER.encode("utf-16-le")) == []
    with open_vault(home, read_only=True) as v:  # and it really is inside
        n = v.con.execute("SELECT count(*) FROM blobs WHERE text LIKE ?", [f"%{MARKER}%"]).fetchone()[0]
        assert n == 304  # one markdown record, 300 rows, the mail, the PDF and the DOCX
        assert v.con.execute("SELECT count(*) FROM data.t1_table").fetchone()[0] == 300
    # a tokenizer and a model trained on it are sealed: neither the text nor the tokenizer's own token strings
    # for it (`ZEBRA`, `ĠZEBRA` in tokenizer.json) are found in any file of the home, checkpoints included
    for args in (["--home", str(home), "train", "tokenizer", "--dataset", "m", "--vocab", "600", "--name", "mk"],
                 ["--home", str(home), "train", "run", "tiny-dense", "--data.datasets", "m", "--data.tokenizer",
                  "mk", "--train.max_steps", "2", "--train.warmup_steps", "1", "--train.checkpoint_every", "1"]):
        r = subprocess.run([PY, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    from transformers import AutoTokenizer

    with artifact(home, home / "artifacts" / "tokenizers" / "mk@1") as path:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    pieces = {t for text in (MARKER, f" {MARKER}") for t in tok.tokenize(text)
              if ("ZEBRA" in t or "QUOKKA" in t) and len(t) >= 4}
    assert any(t.startswith("Ġ") for t in pieces) and any(not t.startswith("Ġ") for t in pieces), pieces
    for needle in sorted(pieces | {MARKER}):
        assert _grep([home, tmpdir], needle.encode()) == [], needle
    assert not any(MARKER in p for p in map(str, Path(tempfile.gettempdir()).glob("*")))
