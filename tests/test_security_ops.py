"""Security fixes through the real commands: key changes check the passphrase first, `vault passwd --rekey`,
`serve` without CORS unless asked (and its key compared in constant time), rollback memory on by default in
`python -m bundles unpack`, and install.sh saying what it checks."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance.errors import WrongPassphrase
from tests.conftest import PASSPHRASE, PY, artifact, copy_home, open_vault, python_env

NEW = "a new passphrase 5678"
TYPO = "test passphrase 1243"


def _files(h: Path) -> dict[str, bytes]:
    """Every byte of the home, by relative path."""
    return {str(p.relative_to(h)): p.read_bytes() for p in sorted(h.rglob("*")) if p.is_file()}


def _records(h: Path, passphrase: str = PASSPHRASE):
    from appliance.home import Home
    from appliance.vault import Vault

    with Vault.open(Home(h), passphrase, read_only=True) as v:
        return v.con.execute("SELECT count(*), sha256(string_agg(text, '' ORDER BY hash)) FROM blobs").fetchone()


# --- item 6: every API entry that rewraps or replaces keys checks the current passphrase first ----------
def test_api_key_changes_with_a_wrong_passphrase_change_nothing(home, cli, samples):
    from appliance import api

    assert cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb").code == 0
    records = _records(home)
    with api.open(home, PASSPHRASE) as v:
        before = _files(home)
        for call in (lambda: api.vault_rekey(v, TYPO),  # used to wrap the new data key under the typo
                     lambda: api.vault_passwd(v, TYPO, NEW),
                     lambda: api.vault_passwd(v, TYPO, NEW, rekey=True)):
            with pytest.raises(WrongPassphrase) as e:
                call()
            assert str(e.value).count("\n") == 0 and str(e.value).startswith("wrong passphrase")
            assert _files(home) == before  # no byte of the home changed: keyring, database, locks, logs
        assert api.vault_datasets(v)["datasets"]  # the open vault still works
    assert _records(home) == records  # and the right passphrase still opens it
    with pytest.raises(WrongPassphrase):
        _records(home, NEW)


def test_passwd_rekey_changes_passphrase_and_data_key(home, cli, samples, monkeypatch):
    assert cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb").code == 0
    helptext = cli("vault", "passwd", "--help").out
    assert "The data key stays" in helptext and "--rekey" in helptext
    records = _records(home)
    with open_vault(home, read_only=True) as v:
        old_key = v.secrets.data_key
    ring_before = json.loads((home / "keyring.json").read_text())
    db_before = (home / "vault.duckdb").read_bytes()

    monkeypatch.setenv("APPLIANCE_NEW_PASSPHRASE", NEW)
    r = cli("--home", home, "--json", "vault", "passwd", "--rekey")
    assert r.code == 0, r.err
    assert r.json["changed"] is True and r.json["rekeyed"] is True

    with pytest.raises(WrongPassphrase):  # the old passphrase no longer opens it
        _records(home, PASSPHRASE)
    assert _records(home, NEW) == records  # the new one does, and every record reads back
    from appliance.home import Home
    from appliance.vault import Vault

    with Vault.open(Home(home), NEW, read_only=True) as v:
        assert v.secrets.data_key != old_key  # a new data key, not the old one re-wrapped
    ring_after = json.loads((home / "keyring.json").read_text())
    assert ring_after["wrapped"] != ring_before["wrapped"] and ring_after["kdf"]["salt"] != ring_before["kdf"]["salt"]
    assert (home / "vault.duckdb").read_bytes() != db_before
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", NEW)
    assert cli("--home", home, "vault", "check").code == 0
    actions = [e["action"] for e in cli("--home", home, "--json", "audit", "log").json["entries"]]
    assert "vault.passwd" in actions and actions.count("vault.rekey") == 2  # start and done

    # plain passwd keeps the data key, as its help says
    monkeypatch.setenv("APPLIANCE_NEW_PASSPHRASE", "a third passphrase 9012")
    with Vault.open(Home(home), NEW, read_only=True) as v:
        key = v.secrets.data_key
    assert cli("--home", home, "--json", "vault", "passwd").json == {"ok": True, "schema": 1, "changed": True}
    with Vault.open(Home(home), "a third passphrase 9012", read_only=True) as v:
        assert v.secrets.data_key == key


# --- item 8a: serve sends no CORS headers unless asked; the key is checked in constant time -------------
@pytest.fixture(scope="module")
def tiny_gguf(train_base, tmp_path_factory) -> Path:
    """A float32 GGUF of a tiny model trained two steps on the handbook."""
    from appliance.quantize import gguf_export
    from appliance.train.config import load_recipe
    from appliance.train.run import run

    h = copy_home(train_base, tmp_path_factory.mktemp("serve"))
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", ["name=sv", "train.max_steps=2", "train.checkpoint_every=1000",
                                          "train.warmup_steps=1"]))
    out = h / "sv.gguf"
    with artifact(h, h / "artifacts" / "models" / "sv@1") as model_dir:  # sealed: opened in memory
        gguf_export.write(model_dir, out, {"id": "sv@1", "name": "sv@1"})
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", **headers: str) -> tuple[int, dict]:
    """(status, headers in lower case) of one request; 4xx answers included."""
    req = urllib.request.Request(url, method=method, headers={k.replace("_", "-"): v for k, v in headers.items()})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


class _Server:
    def __init__(self, gguf: Path, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([PY, "-m", "appliance", "serve", str(gguf), "--port", str(self.port),
                                      "--threads", "1", *args], env=env or python_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> _Server:
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read())
            try:
                _request(f"{self.url}/v1/models")
                return self
            except OSError:
                time.sleep(0.3)
        self.proc.kill()
        raise AssertionError("server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(2)
        self.proc.wait(timeout=30)


def _preflight(url: str, origin: str) -> tuple[int, dict]:
    return _request(f"{url}/v1/chat/completions", "OPTIONS", Origin=origin, Access_Control_Request_Method="POST",
                    Access_Control_Request_Headers="authorization,content-type")


def test_serve_sends_no_cors_headers_unless_asked(tiny_gguf, cli, tmp_path):
    evil = "http://evil.example"
    with _Server(tiny_gguf) as s:  # loopback, no key: the case where any page on the box could ask
        status, h = _request(f"{s.url}/v1/models", Origin=evil)
        assert status == 200 and not any(k.startswith("access-control-") for k in h), h
        status, h = _preflight(s.url, evil)
        assert not any(k.startswith("access-control-") for k in h), (status, h)

    good = "http://localhost:3000"
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    env = {**python_env(), "APPLIANCE_API_KEY_FILE": str(key_file)}
    with _Server(tiny_gguf, "--cors-origin", good, env=env) as s:
        auth = "Bearer s3cret-key"
        status, h = _request(f"{s.url}/v1/models", Origin=good, Authorization=auth)
        assert status == 200 and h["access-control-allow-origin"] == good
        assert "access-control-allow-credentials" not in h
        status, h = _request(f"{s.url}/v1/models", Origin=evil, Authorization=auth)
        assert status == 200 and "access-control-allow-origin" not in h
        status, h = _preflight(s.url, good)
        assert status == 200 and h["access-control-allow-origin"] == good
        status, h = _preflight(s.url, evil)
        assert "access-control-allow-origin" not in h
        assert _request(f"{s.url}/v1/models", Authorization="Bearer s3cret-kex")[0] == 401
        assert _request(f"{s.url}/v1/models")[0] == 401

    for bad in ("*", "http://localhost:3000/", "localhost:3000"):
        r = cli("serve", str(tiny_gguf), "--cors-origin", bad)
        assert r.code == 2 and "--cors-origin" in r.err and r.err.count("\n") == 1, r.err


def test_the_serve_exposure_policy_is_decided_in_the_core(tmp_path):
    """`serve_exposure` (appliance.quantize.infer) is the policy the CLI applies: loopback without a key,
    anything else with one; the key from a file first; origins exact."""
    from appliance.errors import UsageError
    from appliance.quantize.infer import serve_exposure

    assert serve_exposure("127.0.0.1", env={}) == serve_exposure("127.0.0.1", (), {})
    e = serve_exposure("localhost", ["http://localhost:3000"], env={})
    assert (e.host, e.api_key, e.cors_origins) == ("localhost", None, ["http://localhost:3000"])
    for host in ("0.0.0.0", "10.1.2.3", "::", "box.example"):
        with pytest.raises(UsageError, match="without an API key"):
            serve_exposure(host, env={})
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    e = serve_exposure("0.0.0.0", env={"APPLIANCE_API_KEY_FILE": str(key_file), "APPLIANCE_API_KEY": "env"})
    assert e.api_key == "from-file" and serve_exposure("::", env={"APPLIANCE_API_KEY": "env"}).api_key == "env"
    key_file.write_text("  \n")
    with pytest.raises(UsageError, match="is empty"):
        serve_exposure("127.0.0.1", env={"APPLIANCE_API_KEY_FILE": str(key_file)})
    with pytest.raises(UsageError, match="would let any web page"):
        serve_exposure("127.0.0.1", ["*"], env={})


# --- item 8b: unpack keeps rollback memory by default; install.sh says what it checks -------------------
def test_unpack_refuses_an_older_bundle_by_default(tmp_path):
    from bundles import container
    from bundles.keys import SecretKey

    key = SecretKey.generate("site-a")
    pub = tmp_path / "site-a.pub"
    pub.write_text(json.dumps(key.public.to_json()))
    payload = tmp_path / "weights.bin"
    payload.write_bytes(os.urandom(1 << 16))
    bundles = {}
    for version in (5, 4):
        bundles[version] = tmp_path / f"v{version}.bundle"
        container.create(bundles[version], "model", "demo", version, [("weights.bin", payload)], key, {"id": "x"})

    env = {k: v for k, v in python_env().items() if k != "XDG_STATE_HOME"}
    env["HOME"] = str(tmp_path / "edge-home")  # the default state lives under the user's home

    def unpack(version: int, dest: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "bundles", "unpack", str(bundles[version]), "--trust", str(pub), "--to",
                               str(tmp_path / dest), *extra], env=env, capture_output=True, text=True, timeout=120)

    r = unpack(5, "new")
    assert r.returncode == 0 and "ok: model demo v5" in r.stdout, r.stderr
    r = unpack(4, "old")  # no option given: refused all the same
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "v4 is not newer than v5" in r.stderr, r.stderr
    assert not (tmp_path / "old").exists()
    state = tmp_path / "edge-home" / ".local" / "state" / "bundles" / "versions.json"
    assert json.loads(state.read_text()) == {f"model/demo/{key.public.key_id}": 5}
    r = unpack(4, "elsewhere", "--state", str(tmp_path / "other.json"))  # --state chooses the record
    assert r.returncode == 0, r.stderr
    r = unpack(4, "old", "--allow-downgrade")
    assert r.returncode == 0, r.stderr


def test_install_sh_says_what_it_verifies(tmp_path):
    from appliance.wheelhouse import INSTALL_SH

    script = tmp_path / "install.sh"
    script.write_text(INSTALL_SH.format(version="0.1.0", release="0.1.0-abc", python="3.11", machine="x86_64"))
    r = subprocess.run(["sh", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "python -m bundles unpack" in text and "checks no signature" in text
    assert "requirements.txt" in text and "not a deliberate change" in text
