"""The receiving side's trust store: a directory of trusted signers, each for the kinds it may sign."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from bundles.errors import BundleError
from bundles.keys import PublicKey, read_json
from bundles.manifest import KINDS
from bundles.safefile import atomic_write_bytes

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Trusted:
    name: str
    key: PublicKey
    kinds: tuple[str, ...]

    def allows(self, kind: str) -> bool:
        return kind in self.kinds

    def to_json(self) -> dict:
        return {"name": self.name, "key_id": self.key.key_id, "kinds": list(self.kinds), "public": self.key.to_json()}


class TrustStore:
    """`DIR/NAME.json` per trusted signer. A `.pub` file given alone is trusted for every kind."""

    def __init__(self, entries: list[Trusted]):
        self.entries = entries

    @classmethod
    def load(cls, *paths: Path) -> TrustStore:
        entries: list[Trusted] = []
        for p in paths:
            p = Path(p)
            if p.is_dir():
                entries += [_entry(f) for f in sorted(p.glob("*.json"))]
            else:
                key = PublicKey.load(p)
                entries.append(Trusted(key.name or p.stem, key, KINDS))
        return cls(entries)

    def signer(self, key_id: str, kind: str) -> Trusted:
        match = [t for t in self.entries if t.key.key_id == key_id]
        if not match:
            raise BundleError(f"the bundle is signed by key {key_id}, which is not trusted here",
                              "add the signer's public key with `appliance trust add FILE.pub --name SITE`")
        for t in match:
            if t.allows(kind):
                return t
        raise BundleError(f"signer {match[0].name} ({key_id}) is trusted for {', '.join(match[0].kinds)}, "
                          f"not for {kind} bundles", f"`appliance trust add ... --kinds {kind}` to allow it")


def _entry(f: Path) -> Trusted:
    d = read_json(f)
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise BundleError(f"trust entry {f} is damaged", "remove the file and add the signer again")
    return Trusted(d["name"], PublicKey.from_json(d.get("public"), str(f)), tuple(d.get("kinds", ())))


def add(store: Path, key: PublicKey, name: str, kinds: list[str]) -> Trusted:
    if not _NAME.match(name):
        raise BundleError(f"trust name {name!r} is not allowed", "use letters, digits, '.', '_' and '-'")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise BundleError(f"unknown kind(s) {', '.join(bad) or '(none)'}", f"kinds are {', '.join(KINDS)}")
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = store / f"{name}.json"
    for t in TrustStore.load(store).entries:
        if t.name == name:
            raise BundleError(f"a signer named {name} is already trusted", "remove it first, or pick another name")
        if t.key.key_id == key.key_id:
            raise BundleError(f"key {key.key_id} is already trusted as {t.name}", "remove that entry first")
    entry = Trusted(name, key, tuple(kinds))
    atomic_write_bytes(dest, json.dumps(entry.to_json(), indent=2).encode(), 0o600)
    return entry


def remove(store: Path, name: str) -> Trusted:
    for f in sorted(store.glob("*.json")) if store.is_dir() else []:
        entry = _entry(f)
        if entry.name == name:
            f.unlink()
            return entry
    raise BundleError(f"no trusted signer named {name}", "see `appliance trust list`")
