"""What tests/test_benchmarks.py and tests/test_benchmarks_models.py share: run a benchmark at its `--smoke`
size in a child process and read the figures of the Markdown section it writes.

The child runs offline, on one thread, with its temporary files, home and cache in the test's own directory;
`--write` goes to a file there, and docs/BENCHMARKS.md is checked to be left alone. No timing is asserted.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

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
