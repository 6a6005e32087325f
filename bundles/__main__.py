"""`python -m bundles inspect|verify|unpack`: what an edge device runs, with `cryptography` alone.

    python -m bundles verify FILE --trust SITE.pub [--identity EDGE.key]
    python -m bundles unpack FILE --to DIR --trust SITE.pub [--identity EDGE.key] [--state FILE]

`--trust` takes public key files (trusted for every kind) or a trust-store directory. The secret key's
passphrase comes from APPLIANCE_KEY_PASSPHRASE_FILE, APPLIANCE_KEY_PASSPHRASE or a prompt. `unpack`
always remembers the newest version unpacked per kind, bundle name and signer, so an older release (or the
same one again) is refused (rollback); the record is `--state FILE`, by default
$XDG_STATE_HOME/bundles/versions.json (~/.local/state/bundles/versions.json). `--allow-downgrade` overrides.
Exit codes: 0 ok, 1 refused or failed (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bundles import container, safefile
from bundles.errors import BundleError
from bundles.keys import SecretKey
from bundles.trust import TrustStore


def identities(paths: list[Path]) -> list[SecretKey]:
    return [SecretKey.load(p) for p in paths]


def default_state() -> Path:
    """Where `unpack` keeps its rollback memory unless --state says otherwise (XDG's state directory)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "bundles" / "versions.json"


def _state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise BundleError(f"state file {path} is damaged",
                          "restore it; without it rollback cannot be checked") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bundles", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("inspect", "verify", "unpack"):
        p = sub.add_parser(name)
        p.add_argument("file", type=Path)
        p.add_argument("--identity", type=Path, action="append", default=[], help="secret key file (encrypted "
                                                                                   "bundles)")
        if name != "inspect":
            p.add_argument("--trust", type=Path, action="append", required=True, help="public key or trust dir")
            p.add_argument("--max-size", type=int, default=container.DEFAULT_MAX_SIZE)
        if name == "unpack":
            p.add_argument("--to", type=Path, required=True, help="new directory to unpack into")
            p.add_argument("--state", type=Path, default=None,
                           help="file remembering the newest version unpacked per kind, name and signer; an older "
                                f"one is refused (default: {default_state()})")
            p.add_argument("--allow-downgrade", action="store_true")
    a = ap.parse_args(argv)
    try:
        ids = identities(a.identity)
        if a.cmd == "inspect":
            o = container.open_bundle(a.file, ids)
            o.close()
            print(json.dumps({"encrypted": o.encrypted, "recipients": o.recipients, "manifest": o.manifest},
                             indent=2))
            return 0
        trust = TrustStore.load(*a.trust)
        if a.cmd == "verify":
            v = container.verify(a.file, trust, ids, max_size=a.max_size)
        else:
            a.state = a.state or default_state()
            state = _state(a.state)

            def decide(m: dict, signer) -> container.Plan:
                key = f"{m['kind']}/{m['name']}/{signer.key.key_id}"  # rollback per kind, name and signer

                def remember() -> None:  # before the files appear: a crash cannot leave a replayable gap
                    state[key] = max(m["version"], state.get(key, 0))
                    try:
                        a.state.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        safefile.atomic_write_bytes(a.state, json.dumps(state, indent=2).encode())  # no link followed
                    except OSError as e:
                        raise BundleError(f"cannot record the version in {a.state} ({e.strerror})",
                                          "pass --state FILE in a writable directory") from None

                return container.Plan(state.get(key), unpack_to=a.to, before_publish=remember)

            v = container.verify(a.file, trust, ids, allow_downgrade=a.allow_downgrade, max_size=a.max_size,
                                 decide=decide)
        m = v.manifest
        print(f"ok: {m['kind']} {m['name']} v{m['version']}, {len(m['files'])} file(s), {v.size:,} bytes, "
              f"signed by {v.signer.name} ({v.signer.key.key_id})" + (f", unpacked to {a.to}" if a.cmd == "unpack"
                                                                      else ""))
        return 0
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
