"""Envelope keys: passphrase -> Argon2id key-encryption key -> AES-GCM wrapped vault secrets.

The secrets (the DuckDB data key, the pseudonym key, the audit key) are random and never change with the
passphrase: `passwd` re-wraps them, `rekey` replaces the data key alone. Both unwrap with the current
passphrase before they write anything, so a mistyped one cannot wrap the keys under a passphrase nobody knows.
"""

from __future__ import annotations

import base64
import hmac
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

    def same(self, other: Secrets) -> bool:
        """Whether both hold the same keys (compared in constant time)."""
        return hmac.compare_digest(self.to_bytes(), other.to_bytes())

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

    def check(self, passphrase: str, secrets: Secrets) -> None:
        """Refuse unless `passphrase` opens this keyring to `secrets`, the keys of an open vault.

        Raises:
            WrongPassphrase: the passphrase does not open the keyring.
            VaultError: it does, but to other keys (another process rekeyed the vault meanwhile).
        """
        current, _ = self.unlock(passphrase)
        if not current.same(secrets):
            raise VaultError("the keyring holds other keys than this open vault",
                             "another process rekeyed it: open the vault again")

    def rewrap(self, passphrase: str, new_passphrase: str) -> Secrets:
        """Wrap the secrets `passphrase` opens under `new_passphrase` and a fresh salt (passwd); returns them.

        Raises:
            WrongPassphrase: `passphrase` is not the current one; the keyring is left as it was.
        """
        current, pending = self.unlock(passphrase)
        self.kdf = dict(self.kdf, salt=_b64(os.urandom(16)))
        kek = self._kek(new_passphrase)
        self.wrapped = self._wrap(kek, current)
        if self.pending_rekey is not None and pending is not None:  # a half-done rekey stays finishable
            self.pending_rekey = dict(self.pending_rekey, wrapped=self._wrap(kek, pending))
        return current

    def wrap_pending(self, passphrase: str, nxt: Secrets, file: str) -> None:
        """Record `nxt` as the next secrets (rekey), wrapped under the current passphrase.

        Raises:
            WrongPassphrase: `passphrase` does not open the current secrets. Wrapping the next key under it
                would lock the vault for good once the rekey swaps the file, so nothing is changed.
        """
        kek = self._kek(passphrase)
        self._unwrap(kek, self.wrapped)
        self.pending_rekey = {"file": file, "wrapped": self._wrap(kek, nxt)}

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
