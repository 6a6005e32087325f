import json

import pytest

from appliance.errors import VaultError, WrongPassphrase
from appliance.vault.keys import DEFAULT_KDF, Keyring, Secrets


def test_wrap_unwrap_and_wrong_passphrase(tmp_path):
    s = Secrets.generate()
    ring = Keyring.create("right passphrase", s)
    ring.save(tmp_path / "keyring.json")
    loaded = Keyring.load(tmp_path / "keyring.json")
    got, pending = loaded.unlock("right passphrase")
    assert got.data_key == s.data_key and got.pseudonym_key == s.pseudonym_key and pending is None
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        loaded.unlock("wrong passphrase")


def test_kdf_parameters_are_stored_and_floored(tmp_path):
    ring = Keyring.create("pw pw pw pw", Secrets.generate())
    d = json.loads(ring.to_json())
    assert d["kdf"]["name"] == "argon2id" and d["kdf"]["memory_kib"] >= 64 * 1024 and d["kdf"]["iterations"] >= 3
    assert len(d["kdf"]["salt"]) > 16
    with pytest.raises(VaultError, match="below the floor"):
        Keyring.create("pw pw pw pw", Secrets.generate(), dict(DEFAULT_KDF, memory_kib=1024))


def test_no_secret_in_the_clear(tmp_path):
    s = Secrets.generate()
    raw = Keyring.create("pw pw pw pw", s).to_json()
    for secret in (s.data_key, s.pseudonym_key, s.audit_key):
        assert secret.hex().encode() not in raw and secret not in raw


def test_keyring_bound_to_its_vault(tmp_path):
    ring = Keyring.create("pw pw pw pw", Secrets.generate())
    ring.vault_id = "another-vault"  # a wrapped blob moved to another keyring does not open
    with pytest.raises(WrongPassphrase):
        ring.unlock("pw pw pw pw")


def test_passwd_rewraps_same_secrets():
    s = Secrets.generate()
    ring = Keyring.create("old passphrase", s)
    salt = ring.kdf["salt"]
    with pytest.raises(WrongPassphrase):  # the current passphrase is checked first; nothing changes
        ring.rewrap("not the old one", "new passphrase")
    assert ring.kdf["salt"] == salt
    ring.rewrap("old passphrase", "new passphrase")
    assert ring.kdf["salt"] != salt
    assert ring.unlock("new passphrase")[0].data_key == s.data_key
    with pytest.raises(WrongPassphrase):
        ring.unlock("old passphrase")
