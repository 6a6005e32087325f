"""Every benchmark in benchmarks/ still runs (issue 18, "benchmarks rot").

Each script runs at its `--smoke` size in a child process, offline, on one thread, with its temporary files,
home and cache in the test's own directory; the test checks that it exits 0 and prints every figure its
report claims (finite, non-negative numbers in each row and ratio line). No timing is asserted: a smoke
size measures nothing. `--write` goes to a file in the test's directory, and docs/BENCHMARKS.md is checked
to be left alone.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
NUM = r"([-+]?[\d,]+(?:\.\d+)?)"  # 1,482.2 or 0.62 or -0.17 or +0.04


def smoke(script: str, tmp_path: Path, *args: str) -> str:
    """Run `benchmarks/SCRIPT --smoke --write TMP/BENCHMARKS.md ARGS`; its stdout, after checks on its section."""
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    tmp.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               APPLIANCE_TRAIN_THREADS="1", HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"),
               HF_HOME=str(home / ".cache" / "huggingface"), MPLCONFIGDIR=str(home / ".mpl"),
               TORCHINDUCTOR_CACHE_DIR=str(home / ".cache" / "torchinductor"))
    out_md = tmp_path / "BENCHMARKS.md"
    docs_before = DOCS.read_bytes() if DOCS.exists() else None
    r = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--write", str(out_md), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} --smoke failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    assert (DOCS.read_bytes() if DOCS.exists() else None) == docs_before, f"{script} wrote {DOCS}"
    key = script.removesuffix(".py")
    section = out_md.read_text()
    assert f"<!-- {key}:start -->" in section and f"<!-- {key}:end -->" in section
    assert r.stdout.strip() in section  # the printed report is the section written
    assert list(tmp.iterdir()) == [], f"{script} left files behind in its temporary directory"
    return r.stdout


def number(text: str) -> float:
    x = float(text.replace(",", ""))
    assert math.isfinite(x), text
    return x


def row(out: str, label: str, columns: int) -> list[float]:
    """The numbers of the Markdown table row that starts with `label`: exactly `columns` of them, finite."""
    m = re.search(r"^\| " + re.escape(label) + r" \|(.*)\|$", out, re.M)
    assert m, f"no row {label!r} in:\n{out}"
    cells = [c.strip() for c in m.group(1).split("|")]
    nums = [number(c.strip("*").rstrip("x%")) for c in cells if re.fullmatch(r"\**" + NUM + r"[x%]?\**", c)]
    assert len(nums) == columns, f"row {label!r}: {cells}"
    return nums


def ratio(out: str, pattern: str) -> list[float]:
    """The numbers a report's ratio line gives (`pattern` with NUM for each)."""
    m = re.search(pattern.replace("NUM", NUM), out)
    assert m, f"no line matching {pattern!r} in:\n{out}"
    return [number(g) for g in m.groups()]


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
    assert "5 steps" in out and "2 layers x 64" in out  # the smoke size, reported as such
    for label in ("appliance `train run`", "`Trainer`, same packed rows", "`Trainer`, one padded document per row"):
        raw, useful, padding, rss, loss = row(out, label, 5)
        assert raw > 0 and 0 < useful <= raw and 0 <= padding < 100 and rss > 0 and loss > 0, label
    assert all(x > 0 for x in ratio(out, r"raw tokens/s: NUMx\*\*; useful .* padded Trainer: \*\*NUMx\*\*"))


@pytest.mark.slow
def test_edge_inference(tmp_path):
    out = smoke("edge_inference.py", tmp_path, "--threads", "1")
    assert ratio(out, r"fp32 transformers \(`generate`, KV cache\): \*\*NUM tokens/s\*\*")[0] > 0
    for t in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"):
        size, bpw, ppl, delta, top1, kld, tok_s, vs, secs = row(out, t, 9)
        assert size > 0 and 4 < bpw <= 32.5 and ppl > 0 and 0 <= top1 <= 100 and kld >= 0 and tok_s > 0, t
    assert all(x > 0 for x in ratio(out, r"Q4_K_M through llama.cpp / fp32 transformers: NUMx; Q8_0: NUMx"))


@pytest.mark.slow
def test_eval_throughput(tmp_path):
    out = smoke("eval_throughput.py", tmp_path, "--threads", "1")
    cases = None
    for label in ("transformers fp32", "llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_k_m"):
        m = re.search(r"^\| " + re.escape(label) + r" \| " + NUM + r" \| " + NUM + r"x \| (\d+)/(\d+) \|$", out, re.M)
        assert m, f"no row {label!r} in:\n{out}"
        assert number(m.group(1)) > 0 and number(m.group(2)) > 0
        assert int(m.group(3)) <= int(m.group(4))
        assert cases in (None, int(m.group(4)))  # every backend ran the same suite
        cases = int(m.group(4))
    assert cases and cases > 4  # the shipped checks and the cloze questions
    q4, same, total = ratio(out, r"q4_k_m / transformers: NUMx cases/s\*\*; the f32 GGUF gave the same answer as "
                                 r"transformers on NUM of NUM cases")
    assert q4 > 0 and 0 <= same <= total == cases


@pytest.mark.slow
def test_agentic_task(tmp_path):
    out = smoke("agentic_task.py", tmp_path, "--threads", "1")
    m = re.search(r"\| completion rate, greedy, all 12 episodes \(`appliance eval`\) \| " + NUM + r" \| " + NUM, out)
    assert m, out
    assert all(0 <= number(x) <= 1 for x in m.groups())
    m = re.search(r"\| of which the (\d+) validation episodes \(never trained on\) \| (\d+)/\1 \| (\d+)/\1 \|", out)
    assert m, out
    m = re.search(r"\| mean sampled reward, GRPO's first (\d+) / last \1 steps \| " + NUM + r" \| " + NUM, out)
    assert m, out
    assert all(0 <= number(x) <= 1 for x in m.groups()[1:])


@pytest.mark.slow
def test_byo_bases(tmp_path):
    out = smoke("byo_bases.py", tmp_path)
    assert out.startswith("Smoke run (not a measurement)")
    for fam in ("llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2"):
        m = re.search(rf"^\| {fam} \| sample-trained \| q8_0 \| {NUM} \| {NUM} \| (\d+)/(\d+) \| (\d+)/(\d+) \|",
                      out, re.M)
        assert m, f"no q8_0 row for {fam}:\n{out}"
        assert m.group(3) == m.group(4) != "0" and m.group(5) == m.group(6) != "0", m.group(0)  # tokenizer agrees
        assert re.search(rf"^\| {fam} \| sample-trained \| {NUM} \| {NUM} \| .* top-1 {NUM} \|$", out, re.M), fam
