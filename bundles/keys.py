"""Keys: Ed25519 to sign, X25519 to receive encrypted bundles; the secret half sealed under a passphrase.

A key pair is two key pairs under one name and one key id (the first 16 hex digits of SHA-256 over the
Ed25519 public key). The secret file holds both private keys encrypted with ChaCha20-Poly1305 under a key
derived from the passphrase with Argon2id (as minisign seals its secret key with scrypt). The public file
is what other sites put in their trust store, or encrypt to.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bundles.errors import BundleError

SECRET_FORMAT = "appliance-bundle-secret-key-v1"
PUBLIC_FORMAT = "appliance-bundle-public-key-v1"
KDF = {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text, what: str) -> bytes:
    """Strict: only the one canonical encoding of the bytes is accepted (no spare bits, no padding games)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise BundleError(f"{what} is not valid base64", "the file is damaged") from None
    if b64(raw) != text:
        raise BundleError(f"{what} is not in canonical base64", "the file was altered or damaged")
    return raw


def key_id(ed25519_public: bytes) -> str:
    return hashlib.sha256(ed25519_public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    name: str
    key_id: str
    ed25519: bytes
    x25519: bytes

    def to_json(self) -> dict:
        return {"format": PUBLIC_FORMAT, "name": self.name, "key_id": self.key_id, "ed25519": b64(self.ed25519),
                "x25519": b64(self.x25519)}

    @classmethod
    def from_json(cls, d: dict, where: str = "public key") -> PublicKey:
        if not isinstance(d, dict) or d.get("format") != PUBLIC_FORMAT:
            raise BundleError(f"{where} is not an appliance public key", "export one with `appliance keys "
                                                                          "export-public NAME`")
        ed, x = unb64(d.get("ed25519"), where), unb64(d.get("x25519"), where)
        if len(ed) != 32 or len(x) != 32 or d.get("key_id") != key_id(ed):
            raise BundleError(f"{where} is damaged (its key id does not match its key)", "export it again")
        return cls(str(d.get("name", "")), d["key_id"], ed, x)

    @classmethod
    def load(cls, path: Path) -> PublicKey:
        return cls.from_json(_read_json(path), str(path))


@dataclass(frozen=True)
class SecretKey:
    name: str
    ed25519: bytes  # raw private bytes
    x25519: bytes

    @property
    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        ed = Ed25519PrivateKey.from_private_bytes(self.ed25519).public_key().public_bytes_raw()
        x = X25519PrivateKey.from_private_bytes(self.x25519).public_key().public_bytes_raw()
        return PublicKey(self.name, key_id(ed), ed, x)

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.ed25519).sign(data)

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return cls(name, Ed25519PrivateKey.generate().private_bytes_raw(),
                   X25519PrivateKey.generate().private_bytes_raw())

    def seal(self, passphrase: str, kdf: dict | None = None) -> dict:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        kdf = dict(kdf or KDF, salt=b64(os.urandom(16)))
        nonce = os.urandom(12)
        pub = self.public
        sealed = ChaCha20Poly1305(_derive(passphrase, kdf)).encrypt(nonce, self.ed25519 + self.x25519,
                                                                     pub.key_id.encode())
        return {"format": SECRET_FORMAT, "name": self.name, "key_id": pub.key_id, "kdf": kdf, "nonce": b64(nonce),
                "sealed": b64(sealed), "public": pub.to_json()}

    @classmethod
    def load(cls, path: Path) -> SecretKey:
        """A sealed key file, opened with the key passphrase (`key_passphrase()`)."""
        return cls.unseal(_read_json(path), key_passphrase(), str(path))

    @classmethod
    def unseal(cls, d: dict, passphrase: str, where: str = "secret key") -> SecretKey:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if not isinstance(d, dict) or d.get("format") != SECRET_FORMAT:
            raise BundleError(f"{where} is not an appliance secret key", "generate one with `appliance keys "
                                                                          "generate`")
        try:
            raw = ChaCha20Poly1305(_derive(passphrase, d["kdf"])).decrypt(
                unb64(d["nonce"], where), unb64(d["sealed"], where), str(d["key_id"]).encode())
        except InvalidTag:
            raise BundleError(f"wrong passphrase for key {d.get('name')!r}",
                              "check APPLIANCE_KEY_PASSPHRASE[_FILE]") from None
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{where} is damaged", "restore it from a backup") from None
        key = cls(str(d.get("name", "")), raw[:32], raw[32:])
        if key.public.key_id != d["key_id"]:
            raise BundleError(f"{where} is damaged (its key id does not match)", "restore it from a backup")
        return key


def _derive(passphrase: str, kdf: dict) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    if kdf.get("name") != "argon2id":
        raise BundleError(f"unknown key derivation {kdf.get('name')!r}", "the key file is damaged")
    bounds = {"memory_kib": (8192, 4 << 20), "iterations": (1, 100), "lanes": (1, 64)}
    for k, (lo, hi) in bounds.items():
        if not isinstance(kdf.get(k), int) or not lo <= kdf[k] <= hi:
            raise BundleError(f"key derivation {k}={kdf.get(k)!r} is outside {lo}..{hi}", "the key file is damaged")
    return Argon2id(salt=unb64(kdf["salt"], "key salt"), length=32, iterations=int(kdf["iterations"]),
                    lanes=int(kdf["lanes"]), memory_cost=int(kdf["memory_kib"])).derive(passphrase.encode())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist", "check the path") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not a key file ({e.__class__.__name__})", "check the path") from None


def read_json(path: Path) -> dict:
    return _read_json(path)


_GIVEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("key_passphrase", default=None)


@contextlib.contextmanager
def using_passphrase(passphrase: str):
    """Use `passphrase` for keys opened in this block (the console asks for it in a dialog)."""
    token = _GIVEN.set(passphrase)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def key_passphrase() -> str:
    """The secret key's passphrase: one given in code, APPLIANCE_KEY_PASSPHRASE_FILE, APPLIANCE_KEY_PASSPHRASE,
    or a prompt."""
    import sys

    if (given := _GIVEN.get()) is not None:  # given in code (the console): never fall back to a prompt
        return given
    if f := os.environ.get("APPLIANCE_KEY_PASSPHRASE_FILE"):
        try:
            return Path(f).read_text().rstrip("\n")
        except OSError as e:
            raise BundleError(f"cannot read APPLIANCE_KEY_PASSPHRASE_FILE: {e.strerror}", "check the path") from None
    if p := os.environ.get("APPLIANCE_KEY_PASSPHRASE"):
        return p
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("key passphrase: ")
    raise BundleError("no key passphrase given", "set APPLIANCE_KEY_PASSPHRASE_FILE or APPLIANCE_KEY_PASSPHRASE")
