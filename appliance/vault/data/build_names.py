"""Rebuild `names.txt.gz`, the word lists the name detector reads (not imported at run time).

Sources, all public domain:
  - US Census 1990 name files `dist.female.first`, `dist.male.first`, `dist.all.last` (the PyPI package
    `names` carries them: `pip download --no-deps names`, then unpack);
  - Webster's Second International word list `web2` (the PyPI package `english-words` carries it as
    `data/web2_alpha.pickle`, a set of words with their case): its lower-case entries tell ordinary words
    from names.

    python -m appliance.vault.data.build_names CENSUS_DIR WEB2_PICKLE

Writes one line per word under `# first`, `# last` (both in rank order, most frequent first) and `# words`.
"""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

OUT = Path(__file__).with_name("names.txt.gz")


def _census(path: Path) -> list[str]:
    return [line.split()[0].lower() for line in path.read_text().splitlines() if line.strip()]


def build(census: Path, web2: Path) -> None:
    first: dict[str, None] = {}
    for f in ("dist.female.first", "dist.male.first"):
        first.update(dict.fromkeys(_census(census / f)))
    last = _census(census / "dist.all.last")
    with web2.open("rb") as fh:
        words = sorted(w for w in pickle.load(fh) if w.islower() and w.isalpha() and 2 <= len(w) <= 16)
    body = "\n".join(["# first", *first, "# last", *last, "# words", *words]) + "\n"
    OUT.write_bytes(gzip.compress(body.encode(), compresslevel=9, mtime=0))


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
