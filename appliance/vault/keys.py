"""Envelope keys: passphrase -> Argon2id key-encryption key -> AES-GCM wrapped vault secrets.

The secrets (the DuckDB data key, the pseudonym key, the audit key) are random and never change with the
passphrase: `passwd` re-wraps them, `rekey` replaces the data key alone.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from appliance.errors import VaultError, WrongPassphrase
from appliance.home import atomic_write

KEYRING_FORMAT = 1
# OWASP's floor is 19 MiB; an appliance unlocks rarely, so it can afford more.
MIN_MEMORY_KIB = 64 * 1024
MIN_ITERATIONS = 3
DEFAULT_KDF = {"name": "argon2id", "memory_kib": MIN_MEMORY_KIB, "iterations": 3, "lanes": 4}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass
class Secrets:
    """What the passphrase unlocks. Held in memory only."""

    data_key: bytes
    pseudonym_key: bytes
    audit_key: bytes

    @classmethod
    def generate(cls) -> Secrets:
        return cls(os.urandom(32), os.urandom(32), os.urandom(32))

    def to_bytes(self) -> bytes:
        return json.dumps({k: _b64(getattr(self, k)) for k in ("data_key", "pseudonym_key", "audit_key")}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Secrets:
        d = json.loads(raw)
        return cls(_unb64(d["data_key"]), _unb64(d["pseudonym_key"]), _unb64(d["audit_key"]))

    @property
    def duckdb_key(self) -> str:
        """The string DuckDB takes as ENCRYPTION_KEY: the data key in hex."""
        return self.data_key.hex()


@dataclass
class Keyring:
    """The on-disk keyring.json: KDF parameters, salt and wrapped secrets; nothing secret in the clear."""

    vault_id: str
    created: str
    kdf: dict
    wrapped: dict
    pending_rekey: dict | None = None
    database: dict = field(default_factory=lambda: {"file": "vault.duckdb", "cipher": "GCM"})

    # --- wrapping -------------------------------------------------------------------------------
    def _aad(self) -> bytes:
        return f"appliance-keyring/{KEYRING_FORMAT}/{self.vault_id}".encode()

    def _kek(self, passphrase: str) -> bytes:
        k = self.kdf
        if k.get("name") != "argon2id":
            raise VaultError(f"keyring uses unknown KDF {k.get('name')!r}", "upgrade the appliance")
        return Argon2id(
            salt=_unb64(k["salt"]), length=32, iterations=k["iterations"], lanes=k["lanes"],
            memory_cost=k["memory_kib"],
        ).derive(passphrase.encode("utf-8"))

    def _wrap(self, kek: bytes, secrets: Secrets) -> dict:
        nonce = os.urandom(12)
        ct = AESGCM(kek).encrypt(nonce, secrets.to_bytes(), self._aad())
        return {"cipher": "aes-256-gcm", "nonce": _b64(nonce), "ciphertext": _b64(ct)}

    def _unwrap(self, kek: bytes, wrapped: dict) -> Secrets:
        try:
            raw = AESGCM(kek).decrypt(_unb64(wrapped["nonce"]), _unb64(wrapped["ciphertext"]), self._aad())
        except InvalidTag:
            raise WrongPassphrase() from None
        return Secrets.from_bytes(raw)

    @classmethod
    def create(cls, passphrase: str, secrets: Secrets, kdf: dict | None = None) -> Keyring:
        params = dict(kdf or DEFAULT_KDF)
        if params["memory_kib"] < MIN_MEMORY_KIB or params["iterations"] < MIN_ITERATIONS:
            raise VaultError("KDF parameters below the floor", "use at least 64 MiB and 3 iterations")
        params["salt"] = _b64(os.urandom(16))
        ring = cls(
            vault_id=str(uuid.uuid4()), created=datetime.now(UTC).isoformat(timespec="seconds"),
            kdf=params, wrapped={},
        )
        ring.wrapped = ring._wrap(ring._kek(passphrase), secrets)
        return ring

    def unlock(self, passphrase: str) -> tuple[Secrets, Secrets | None]:
        """The current secrets and, while a rekey is half done, the next ones."""
        kek = self._kek(passphrase)
        current = self._unwrap(kek, self.wrapped)
        pending = self._unwrap(kek, self.pending_rekey["wrapped"]) if self.pending_rekey else None
        return current, pending

    def rewrap(self, passphrase: str, secrets: Secrets) -> None:
        """Wrap `secrets` under a fresh salt for `passphrase` (passwd)."""
        self.kdf = dict(self.kdf, salt=_b64(os.urandom(16)))
        self.wrapped = self._wrap(self._kek(passphrase), secrets)

    def wrap_pending(self, passphrase: str, nxt: Secrets, file: str) -> None:
        self.pending_rekey = {"file": file, "wrapped": self._wrap(self._kek(passphrase), nxt)}

    # --- file -----------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": KEYRING_FORMAT, "vault_id": self.vault_id, "created": self.created,
                "kdf": self.kdf, "wrapped": self.wrapped, "pending_rekey": self.pending_rekey,
                "database": self.database,
            },
            indent=2,
        ).encode()

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            d = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise VaultError(f"no vault at {path.parent}", "run `appliance init` or pass --home") from None
        except (OSError, ValueError) as e:
            raise VaultError(f"keyring {path} is unreadable ({e})", "restore it from a backup") from e
        if d.get("format") != KEYRING_FORMAT:
            raise VaultError(f"keyring format {d.get('format')} is not supported", "upgrade the appliance")
        try:
            return cls(d["vault_id"], d["created"], d["kdf"], d["wrapped"], d.get("pending_rekey"),
                       d.get("database") or {"file": "vault.duckdb", "cipher": "GCM"})
        except KeyError as e:
            raise VaultError(f"keyring {path} lacks {e}", "restore it from a backup") from e
