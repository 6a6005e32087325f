"""The README's first-day walkthrough, run exactly as written: every line a new operator would type, in a
fresh HOME, through the installed `appliance` command. The score it prints is reported, never asserted
(what a few hundred CPU steps learn differs between machines); that it runs, and says what it did, is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- walkthrough -->"

pytestmark = pytest.mark.slow


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, "the README lost its walkthrough marker"
    m = re.search(re.escape(MARKER) + r"\s*```sh\n(.*?)\n```", text, re.S)
    assert m, "the walkthrough marker must be followed by a ```sh block"
    return m.group(1)


def test_the_walkthrough_is_shell_a_user_can_paste():
    block = walkthrough()
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("umask 077") and any(ln.startswith("appliance init") for ln in lines)
    # every command is the real one: nothing here calls python or points into the source tree
    assert not re.search(r"\bpython\b|appliance/|tests/", block)


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "HF_"))}
    bin_dir = str(Path(sys.executable).parent)
    env.update(HOME=str(tmp_path), PATH=bin_dir + os.pathsep + env.get("PATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TERM="dumb", COLUMNS="100")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    out = r.stdout
    scores = re.findall(r"(\d+)/36 cases passed", out)
    assert len(scores) == 3, out[-3000:]  # the model, its GGUF, and the GGUF at the receiving site
    print("walkthrough scores (of 36 sample questions):", scores)
    # the receiving site shows where the model came from, under the sender's id
    assert "hospital" in out and "bundle" in out
    for home in ("forge", "edge-site"):
        assert (tmp_path / home).stat().st_mode & 0o077 == 0
    assert (tmp_path / "model.bundle").stat().st_mode & 0o077 == 0
