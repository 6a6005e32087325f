"""Every benchmark in benchmarks/ still runs (issue 18, "benchmarks rot"): the data, bundle and training ones.

Each script runs at its `--smoke` size in a child process (tests/bench_helpers.py); the test checks that it
exits 0 and prints every figure its report claims (finite, non-negative numbers in each row and ratio line).
No timing is asserted: a smoke size measures nothing. The model benchmarks (GGUF, eval, agentic, bases) are
in tests/test_benchmarks_models.py, so that two workers share the benchmarks (`--dist loadfile`).
"""

from __future__ import annotations

import re

import pytest

from tests.bench_helpers import NUM, number, ratio, row, smoke


def test_vault_ingest(tmp_path):
    out = smoke("vault_ingest.py", tmp_path)
    kinds = re.search(r"item kinds ([a-z, ]+);", out)
    assert kinds, out
    # every item kind the sample corpus holds went through the real readers, tables included
    assert {"code", "docx", "email", "mbox", "pdf", "table", "text"} <= set(kinds.group(1).split(", "))
    assert number(re.search(r"; (\d+) tables\)", out).group(1)) > 0
    for stage in ("parse (readers)", "PII scan + redact", "encrypted write", "end-to-end ingest",
                  "baseline: bare DuckDB insert of the parsed text"):
        assert all(x > 0 for x in row(out, stage, 2)), stage
    assert all(x > 0 for x in ratio(out, r"\*\*end-to-end / bare insert\*\* \| \*\*NUMx\*\* \| \*\*NUMx\*\*"))
    took, busy = ratio(out, r"\*mixed\* took NUM s, the ingest process busy NUM s of CPU")  # where end-to-end went
    assert took > 0 and busy > 0
    secs, rate, rss = ratio(out, r"ingested in NUM s \(NUM MB/s\), peak RSS \*\*NUM MB\*\*")
    assert rss > 0


def test_pii_recall(tmp_path):
    out = smoke("pii_recall.py", tmp_path)
    labels, negatives = ratio(out, r"documents of the \*eval\* split \(NUM KB\): NUM labeled identifiers, NUM hard")[1:]
    assert labels > 0 and negatives > 0
    for t in ("PERSON", "EMAIL", "ADDRESS", "DATE", "FAX", "URL"):
        m = re.search(r"^\| " + t + r" \| (\d+) \| " + NUM + r" \| " + NUM + r" \|", out, re.M)
        assert m, f"no row {t} in:\n{out}"
        assert int(m.group(1)) > 0 and 0 <= number(m.group(2)) <= 1 and 0 <= number(m.group(3)) <= 1, t
    recall, precision = ratio(out, r"\*\*Names: recall NUM, precision NUM\*\*")
    assert 0 <= recall <= 1 and 0 <= precision <= 1
    assert 0 <= ratio(out, r"\*\*Look-alikes kept: NUM\*\*")[0] <= 1
    assert ratio(out, r"\*\*NUM MB/s\*\* \(appliance\)")[0] > 0
    assert "scrubadub" in out  # measured beside it, or said to be not installed


def test_bundle_throughput(tmp_path):
    out = smoke("bundle_throughput.py", tmp_path)
    for label in ("`sha256sum` (baseline)", "bundle verify (plain)", "bundle export (plain)",
                  "bundle verify (encrypted)", "bundle export (encrypted)"):
        assert all(x > 0 for x in row(out, label, 2)), label
    assert row(out, "`sha256sum` (baseline)", 2)[1] == 1.0
    assert all(x > 0 for x in ratio(out, r"\*\*verify / sha256sum: NUMx\*\*.*one core: NUMx"))


def test_sealed_io(tmp_path):
    out = smoke("sealed_io.py", tmp_path)
    plain, sealed, vs = row(out, "bundle verify", 3)  # plain MB/s, sealed MB/s, ratio (the aim is no figure)
    assert plain > 0 and sealed > 0 and vs > 0
    assert ratio(out, r"\*\*bundle verify, sealed / plain: NUMx\*\* \(aim: >= NUMx\)") == [vs, 0.7]


@pytest.mark.slow
def test_train_throughput(tmp_path):
    out = smoke("train_throughput.py", tmp_path, "--threads", "1")
    assert "4 steps" in out and "2 layers x 64" in out  # the smoke size, reported as such
    for label in ("appliance `train run`", "`Trainer`, same packed rows", "`Trainer`, one padded document per row"):
        raw, useful, padding, rss, loss = row(out, label, 5)
        assert raw > 0 and 0 < useful <= raw and 0 <= padding < 100 and rss > 0 and loss > 0, label
    assert all(x > 0 for x in ratio(out, r"raw tokens/s: NUMx\*\*; useful .* padded Trainer: \*\*NUMx\*\*"))
