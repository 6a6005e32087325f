"""Vault ingest throughput: each stage in MB/s, and end-to-end against a bare DuckDB insert.

    python benchmarks/vault_ingest.py [--mb 40] [--big-gb 0] [--write docs/BENCHMARKS.md]

Corpora: *mixed*, the sample generator run with many seeds (markdown, mail, a code repository, PDF and
DOCX; tables left out so every stage sees the same records), and *prose*, long markdown documents.
Stages (parse, pii, write on one core; end-to-end with the default worker processes):
  parse      readers only (files -> records)
  pii        redact-mode scrubbing of the parsed text
  write      records -> encrypted vault (hashing, batches, AES-GCM DuckDB)
  end-to-end `ingest()` into a fresh encrypted vault (parse + PII + write + commit)
  baseline   the same already-parsed text inserted into a bare, unencrypted DuckDB file, same schema
With --big-gb N, a tree of N GB is also ingested in a child process and its peak RSS reported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import update_section  # noqa: E402

PASS = "benchmark passphrase"


def build_corpus(root: Path, mb: float) -> Path:
    from appliance.samples import generate

    out = root / "corpus"
    out.mkdir()
    seed, total = 0, 0
    while total < mb * 1e6:
        d = out / f"s{seed:03d}"
        generate(d, seed)
        for sub in ("tables", "instructions"):  # every stage sees the same records
            for p in sorted((d / sub).rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            (d / sub).rmdir()
        total += sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        seed += 1
    return out


def parse(corpus: Path):
    from appliance.vault.readers import ReadError
    from appliance.vault.readers.detect import plan
    from appliance.vault.scan import Skip, read_item

    recs = []
    for item in plan([corpus]):
        if item.kind == "skip":
            continue
        try:
            recs.extend(read_item(item))
        except (ReadError, Skip):  # binary files in the repository are skipped by policy
            pass
    return recs


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def mb(texts) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def bare_insert(texts: list[str], path: Path) -> float:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE blobs (hash VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, bytes BIGINT NOT NULL)")
    t = time.perf_counter()
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= 8 << 20:
            _insert(con, batch, pa)
            batch, size = [], 0
    _insert(con, batch, pa)
    con.execute("CHECKPOINT")
    con.close()
    return time.perf_counter() - t


def _insert(con, batch, pa):
    if not batch:
        return
    uniq = {hashlib.sha256(t.encode()).hexdigest(): t for t in batch}
    con.register("_b", pa.table({"hash": list(uniq), "text": list(uniq.values()),
                                 "bytes": [len(t.encode()) for t in uniq.values()]}))
    con.execute("INSERT OR IGNORE INTO blobs SELECT * FROM _b")
    con.unregister("_b")


def encrypted_write(recs, scrubbed: list[str], home: Path) -> float:
    from appliance.home import Home
    from appliance.vault import Vault
    from appliance.vault.ingest import _Writer

    with Vault.init(Home(home), PASS) as v:
        v.con.execute("SET checkpoint_threshold = '1GB'")
        t = time.perf_counter()
        w = _Writer(v.con, 1, 0, 0.05)
        seen = set()
        for rec, text in zip(recs, scrubbed):
            data = text.encode("utf-8")
            h = hashlib.sha256(data).hexdigest()
            if h not in seen:
                seen.add(h)
                w.add(rec, text, h, len(data))
        w.flush()
        v.con.execute("CHECKPOINT")
        return time.perf_counter() - t


def end_to_end(corpus: Path, home: Path) -> tuple[float, int]:
    from appliance.home import Home
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    with Vault.init(Home(home), PASS) as v:
        t = time.perf_counter()
        r = ingest(v, [corpus], "bench")
        v.con.execute("CHECKPOINT")
        return time.perf_counter() - t, r.bytes


def big_tree(root: Path, gb: float) -> Path:
    d = root / "big"
    d.mkdir(parents=True)
    words = ("the FROSTLINE calibration aligns the cryogenic sensors against the reference bath while the "
             "KESTREL telemetry bus carries frames and operators log every override in the marrow log").split()
    import random

    rng = random.Random(0)
    target, n, i = gb * 1e9, 0, 0
    phrases = [" ".join(rng.choice(words) for _ in range(14)) for _ in range(1000)]
    while n < target:
        # ~25 MB per file; a line id in letters keeps every record distinct (nothing dedupes away)
        # without turning prose into digit runs that the PII scan must inspect
        body = f"# document {_letters(i)}\n" + "".join(
            f"{phrases[j % 1000]} {_letters(i)}-{_letters(j)}\n" for j in range(250000))
        (d / f"doc{i:05d}.md").write_text(body)
        n += len(body)
        i += 1
    return d


def _letters(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 26)
        out = chr(97 + r) + out
        if not n:
            return out


def big_rss(corpus: Path, home: Path) -> tuple[float, float, int]:
    env = dict(os.environ, APPLIANCE_PASSPHRASE=PASS)
    py = sys.executable
    subprocess.run([py, "-m", "appliance", "--home", str(home), "init"], env=env, check=True, capture_output=True)
    t = time.perf_counter()
    r = subprocess.run([py, "-m", "appliance", "--home", str(home), "--json", "vault", "ingest", str(corpus),
                        "--dataset", "big"], env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    return secs, rss_mb, size


def measure(corpus: Path, work: Path) -> dict:
    """Every stage on one corpus; MB/s of text."""
    from appliance.vault.pii import Scrubber

    work.mkdir()
    recs, t_parse = timed(lambda: parse(corpus))
    size = mb(r.text for r in recs)
    scrub = Scrubber("redact")
    scrubbed, t_pii = timed(lambda: [scrub.scrub(r.text, r.name_hints)[0] for r in recs])
    t_bare = bare_insert(scrubbed, work / "bare.duckdb")
    t_write = encrypted_write(recs, scrubbed, work / "enc")
    t_e2e, e2e_bytes = end_to_end(corpus, work / "e2e")
    return {"size": size, "records": len(recs), "parse": size / t_parse, "pii": size / t_pii,
            "write": mb(scrubbed) / t_write, "e2e": e2e_bytes / 1e6 / t_e2e, "bare": mb(scrubbed) / t_bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40.0, help="size of each corpus in MB")
    ap.add_argument("--big-gb", type=float, default=0.0, help="also ingest a tree of this many GB, report RSS")
    ap.add_argument("--write", type=Path, default=None, help="update this markdown file's vault section")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        mixed = measure(build_corpus(root, args.mb), root / "m")
        prose = measure(big_tree(root, args.mb / 1000), root / "p")
        big = big_rss(big_tree(root / "b", args.big_gb), root / "bighome") if args.big_gb else None

    stages = [("parse (readers)", "parse"), ("PII scan + redact", "pii"), ("encrypted write", "write"),
              ("end-to-end ingest", "e2e"), ("baseline: bare DuckDB insert of the parsed text", "bare")]
    from appliance.vault.ingest import default_workers

    lines = [f"python {sys.version.split()[0]}, {os.cpu_count()} cores. Stages run on one core; end-to-end "
             f"ingest reads and scrubs in {default_workers()} worker processes (the default here). "
             f"Two corpora of about "
             f"{args.mb:.0f} MB: *mixed* is the sample generator over many seeds (mail-heavy: {mixed['records']} "
             f"records averaging {mixed['size'] * 1e6 / mixed['records'] / 1024:.1f} KiB, dense with PII); "
             f"*prose* is long markdown documents with no PII.", "",
             "| stage (MB/s) | mixed | prose |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {mixed[k]:.1f} | {prose[k]:.1f} |" for name, k in stages]
    lines += ["| **end-to-end / bare insert** | "
              f"**{mixed['e2e'] / mixed['bare']:.2f}x** | **{prose['e2e'] / prose['bare']:.2f}x** |", "",
              "Aims: end-to-end >= 0.5x the bare insert; PII scan >= 30 MB/s per core."]
    if big:
        secs, rss, nbytes = big
        lines += ["", f"Large tree (prose, through the CLI in a child process): {nbytes / 1e9:.2f} GB ingested "
                  f"in {secs:.0f} s ({nbytes / 1e6 / secs:.1f} MB/s), peak RSS **{rss:.0f} MB** (aim < 1024)."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        update_section(args.write, "vault_ingest", "Vault ingest (`benchmarks/vault_ingest.py`)", text)


if __name__ == "__main__":
    main()
