"""Which code made an artifact: the package version plus a hash of the package's source."""

from __future__ import annotations

import hashlib
from pathlib import Path


def code_version() -> str:
    """The package version plus a hash of its source: which code made an artifact."""
    from appliance import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
