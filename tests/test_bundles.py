"""Bundles: every refusal the format promises, a fuzz test over real bundles, the edge-device path with
`cryptography` alone, and the appliance's keys / trust / bundle commands end to end."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundles import container, manifest
from bundles.errors import BundleError
from bundles.keys import SecretKey
from bundles.trust import Trusted, TrustStore
from tests.conftest import PY, artifact, python_env

KEY = SecretKey.generate("site-a")
EDGE = SecretKey.generate("edge")
TRUST = TrustStore([Trusted("site-a", KEY.public, ("model", "gguf"))])


@pytest.fixture
def src(tmp_path) -> list[tuple[str, Path]]:
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(os.urandom(3 << 20))
    (d / "sub" / "config.json").write_text('{"a": 1}')
    (d / "empty").write_bytes(b"")
    return [("weights.bin", d / "weights.bin"), ("sub/config.json", d / "sub" / "config.json"),
            ("empty", d / "empty")]


def make(tmp_path, src, encrypt=False, **kw) -> Path:
    out = tmp_path / ("enc.bundle" if encrypt else "plain.bundle")
    container.create(out, kw.pop("kind", "model"), "demo", kw.pop("version", 3), src, KEY, {"id": "demo@3"},
                     [EDGE.public] if encrypt else None, **kw)
    return out


def refused(path: Path, match: str, tmp_path: Path, **kw) -> None:
    dest = tmp_path / "out" / "x"
    trust, ids = kw.pop("trust", TRUST), kw.pop("ids", [EDGE])
    with pytest.raises(BundleError, match=match):
        container.verify(path, trust, ids, unpack_to=dest, **kw)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # nothing written, no temp directory left
    if not path.read_bytes().startswith(container.ENC_MAGIC):
        with pytest.raises(BundleError, match=match):  # the parallel verify path refuses it too
            container.verify(path, trust, ids, **kw)


def forge(tmp_path: Path, m: dict, data: bytes, key: SecretKey = KEY) -> Path:
    """A bundle with any manifest, signed by `key`: what a crafted or buggy sender could produce."""
    mb = manifest.canonical(m)
    sig = base64.b64encode(key.sign(container.SIGN_DOMAIN + mb)).decode()
    header = manifest.canonical({"manifest": mb.decode(), "signature": sig})
    p = tmp_path / "forged.bundle"
    p.write_bytes(container.MAGIC + struct.pack("<Q", len(header)) + header + data)
    return p


def base_manifest(tmp_path, src) -> tuple[dict, bytes]:
    p = make(tmp_path, src)
    o = container.open_bundle(p)
    data = p.read_bytes()[o.data_offset:]
    o.close()
    p.unlink()
    return o.manifest, data


@pytest.mark.parametrize("encrypt", [False, True])
def test_round_trip(tmp_path, src, encrypt):
    p = make(tmp_path, src, encrypt)
    v = container.verify(p, TRUST, [EDGE])
    assert v.signer.name == "site-a" and v.manifest["version"] == 3 and v.encrypted == encrypt
    dest = tmp_path / "unpacked"
    container.verify(p, TRUST, [EDGE], unpack_to=dest)
    for rel, s in src:
        assert (dest / rel).read_bytes() == s.read_bytes()
    if encrypt:  # nothing of the content shows in the file
        assert src[1][1].read_bytes() not in p.read_bytes() and b"demo@3" not in p.read_bytes()


@pytest.mark.parametrize("encrypt", [False, True])
def test_flipped_truncated_extended(tmp_path, src, encrypt):
    p = make(tmp_path, src, encrypt)
    data = p.read_bytes()
    for at in (len(data) // 2, len(data) - 5, 40):
        p.write_bytes(data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:])
        refused(p, "changed|does not|not valid|canonical|damaged|altered", tmp_path)
    p.write_bytes(data[:-7])
    refused(p, "truncated|does not authenticate", tmp_path)
    p.write_bytes(data + b"\0")
    refused(p, "more than its manifest|after its last|does not authenticate", tmp_path)


def rewrite_header(p: Path, edit) -> None:
    """Replace a plain bundle's header with `edit(header dict) -> header bytes`, keeping its data."""
    o = container.open_bundle(p)
    o.close()
    raw = p.read_bytes()
    header = edit(json.loads(raw[len(container.MAGIC) + 8:o.data_offset]))
    p.write_bytes(container.MAGIC + struct.pack("<Q", len(header)) + header + raw[o.data_offset:])


def test_manifest_edited_after_signing(tmp_path, src):
    p = make(tmp_path, src)
    rewrite_header(p, lambda h: manifest.canonical(
        {**h, "manifest": manifest.canonical(dict(json.loads(h["manifest"]), version=99)).decode()}))
    refused(p, "signature does not verify", tmp_path)


def test_the_header_has_one_form_only(tmp_path, src):
    """The same release cannot exist as different bytes: header whitespace and base64 spare bits count."""
    p = make(tmp_path, src)
    rewrite_header(p, lambda h: json.dumps(h).encode())  # the same JSON with spaces
    refused(p, "not in canonical form", tmp_path)
    p = make(tmp_path, src)
    # 64 bytes in base64: the last data character carries 2 spare bits
    rewrite_header(p, lambda h: manifest.canonical(
        {**h, "signature": h["signature"][:-3] + chr(ord(h["signature"][-3]) ^ 1) + h["signature"][-2:]}))
    refused(p, "canonical base64|not valid base64|does not verify", tmp_path)


def _enc_parts(p: Path) -> tuple[bytes, dict, bytes]:
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[len(container.ENC_MAGIC):len(container.ENC_MAGIC) + 8])[0]
    start = len(container.ENC_MAGIC) + 8
    return raw[:start + n], json.loads(raw[start:start + n]), raw[start + n:]


def test_encrypted_stream_chunks_dropped_reordered_cut(tmp_path, src):
    from bundles import crypt

    p = make(tmp_path, src, encrypt=True)
    head, _, body = _enc_parts(p)
    size = crypt.CHUNK + crypt.TAG
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    assert len(chunks) >= 4
    for _how, new in (("drop", chunks[:1] + chunks[2:]), ("swap", [chunks[1], chunks[0], *chunks[2:]]),
                      ("cut at a boundary", chunks[:-1]), ("repeat", chunks + chunks[-1:])):
        p.write_bytes(head + b"".join(new))
        refused(p, "does not authenticate|truncated|after its last", tmp_path)


def test_recipients_are_what_the_signer_chose(tmp_path, src):
    from bundles import crypt
    from bundles.keys import b64

    p = make(tmp_path, src, encrypt=True)
    head, eh, body = _enc_parts(p)
    # a recipient strips the encryption and passes the inner bundle on in the clear
    key = crypt.unwrap(eh["recipients"], [EDGE])
    reader = crypt.DecryptingReader(__import__("io").BytesIO(body), key, base64.b64decode(eh["nonce"]))
    inner = reader.read(1 << 30)
    p.write_bytes(inner)
    refused(p, "arrives in the clear", tmp_path)
    # ... or re-encrypts it to someone else
    other = SecretKey.generate("other")
    k2, n2 = crypt.new_key_and_nonce()
    out = __import__("io").BytesIO()
    w = crypt.EncryptingWriter(out, k2, n2)
    w.write(inner)
    w.close()
    h2 = crypt.seal_header({"recipients": crypt.wrap(k2, [other.public]), "nonce": b64(n2), "chunk": crypt.CHUNK}, k2)
    p.write_bytes(container.ENC_MAGIC + struct.pack("<Q", len(h2)) + h2 + out.getvalue())
    refused(p, "re-encrypted", tmp_path, ids=[other])
    # the encryption header itself is authenticated: an added stanza shows
    fake = {**eh, "recipients": eh["recipients"] + [{**eh["recipients"][0], "key_id": "0" * 16}]}
    h3 = manifest.canonical(fake)
    p.write_bytes(container.ENC_MAGIC + struct.pack("<Q", len(h3)) + h3 + body)
    refused(p, "encryption header was altered", tmp_path)


def test_an_existing_or_linked_destination_is_refused(tmp_path, src):
    p = make(tmp_path, src)
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "x"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="already exists"):
        container.verify(p, TRUST, unpack_to=link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_untrusted_signer_and_wrong_kind(tmp_path, src):
    p = make(tmp_path, src)
    stranger = TrustStore([Trusted("other", SecretKey.generate("x").public, ("model",))])
    refused(p, "not trusted here", tmp_path, trust=stranger)
    gguf_only = TrustStore([Trusted("site-a", KEY.public, ("gguf",))])
    refused(p, "trusted for gguf, not for model", tmp_path, trust=gguf_only)


def test_rollback_expiry_and_recipient(tmp_path, src):
    p = make(tmp_path, src, encrypt=True, expires_days=1)
    refused(p, "not newer than v3", tmp_path, last_version=3)
    assert container.verify(p, TRUST, [EDGE], last_version=3, allow_downgrade=True).manifest["version"] == 3
    container.verify(p, TRUST, [EDGE], last_version=2)  # newer is fine
    refused(p, "expired", tmp_path, now=datetime.now(UTC) + timedelta(days=2))
    refused(p, "encrypted to other recipients", tmp_path, ids=[SecretKey.generate("someone")])
    refused(p, "is encrypted", tmp_path, ids=[])


@pytest.mark.parametrize("entry, match", [
    ({"path": "/etc/passwd"}, "is absolute"),
    ({"path": "../../outside"}, "has an empty, '.' or '..' component"),
    ({"path": "a/./b"}, "has an empty, '.' or '..' component"),
    ({"path": "a//b"}, "has an empty, '.' or '..' component"),
    ({"path": "C:/windows"}, "is absolute"),
    ({"path": "a\\b"}, "backslash"),
    ({"type": "symlink"}, "is a 'symlink', not a regular file"),
    ({"type": "hardlink"}, "is a 'hardlink', not a regular file"),
    ({"type": "device"}, "is a 'device', not a regular file"),
])
def test_unsafe_entries_are_refused(tmp_path, src, entry, match):
    m, data = base_manifest(tmp_path, src)
    m["files"][1] = {**m["files"][1], **entry}
    refused(forge(tmp_path, m, data), match, tmp_path)


def test_duplicates_sizes_and_limits(tmp_path, src):
    m, data = base_manifest(tmp_path, src)
    dup = json.loads(json.dumps(m))
    dup["files"][2] = {**dup["files"][2], "path": "SUB/config.json"}
    refused(forge(tmp_path, dup, data), "appears twice", tmp_path)
    clash = json.loads(json.dumps(m))
    clash["files"][2] = {**clash["files"][2], "path": "sub"}
    refused(forge(tmp_path, clash, data), "both a file and a directory", tmp_path)
    size = json.loads(json.dumps(m))
    size["files"][1]["size"] += 2
    refused(forge(tmp_path, size, data), "truncated|changed", tmp_path)
    size["files"][1]["size"] -= 4
    refused(forge(tmp_path, size, data), "more than its manifest|changed", tmp_path)
    refused(forge(tmp_path, m, data), "more than the limit", tmp_path, max_size=1 << 20)


def test_fuzzed_bundles_are_refused_or_identical(tmp_path_factory):
    """Mutants of a real bundle (plain and encrypted): each is refused, or unpacks to the same content."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    root = tmp_path_factory.mktemp("fuzz")
    files = []
    for i, size in enumerate((5000, 1, 70000)):
        f = root / f"f{i}"
        f.write_bytes(os.urandom(size))
        files.append((f"d/f{i}", f))
    bundles = {}
    for enc in (False, True):
        out = root / f"b{int(enc)}.bundle"
        container.create(out, "model", "fz", 1, files, KEY, None, [EDGE.public] if enc else None)
        bundles[enc] = out.read_bytes()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(enc=st.booleans(), ops=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "drop", "set"]),
                                                     st.integers(0, 1 << 20), st.integers(0, 255)),
                                           min_size=1, max_size=3))
    def check(enc, ops):
        data = bytearray(bundles[enc])
        for op, pos, val in ops:
            if not data and op != "insert":
                continue
            pos %= max(1, len(data))
            if op == "flip":
                data[pos] ^= 1 << (val % 8)
            elif op == "set":
                data[pos] = val
            elif op == "cut":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = bytes([val])
            else:
                del data[pos:pos + 1 + val]
        p = root / "mutant.bundle"
        p.write_bytes(bytes(data))
        dest = root / "dest"
        shutil.rmtree(dest, ignore_errors=True)
        try:
            container.verify(p, TRUST, [EDGE])  # the parallel path (plain) and the stream path must agree
            quick = True
        except BundleError:
            quick = False
        try:
            container.verify(p, TRUST, [EDGE], unpack_to=dest)
        except BundleError:
            assert not dest.exists() and not quick
            return
        assert quick
        for rel, f in files:  # accepted: then it is the same content
            assert (dest / rel).read_bytes() == f.read_bytes()

    check()


GUARD = textwrap.dedent('''
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "duckdb", "transformers", "numpy", "appliance"):
                raise ImportError(f"{name} is not installed on this edge device")
    sys.meta_path.insert(0, _Block())
''')


def test_edge_device_needs_only_cryptography(tmp_path, src):
    p = make(tmp_path, src, encrypt=True)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    key_file = tmp_path / "edge.key"
    key_file.write_text(json.dumps(EDGE.seal("edge pass", {"name": "argon2id", "memory_kib": 8192,
                                                           "iterations": 1, "lanes": 1})))
    pub = tmp_path / "site-a.pub"
    pub.write_text(json.dumps(KEY.public.to_json()))
    env = {**python_env(), "PYTHONPATH": f"{guard}:{Path(__file__).resolve().parents[1]}",
           "APPLIANCE_KEY_PASSPHRASE": "edge pass"}
    state = tmp_path / "state.json"
    args = ["--trust", str(pub), "--identity", str(key_file)]
    r = subprocess.run([PY, "-m", "bundles", "unpack", str(p), "--to", str(tmp_path / "model"), "--state",
                        str(state), *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok: model demo v3" in r.stdout
    assert (tmp_path / "model" / "weights.bin").read_bytes() == src[0][1].read_bytes()
    assert json.loads(state.read_text()) == {f"model/demo/{KEY.public.key_id}": 3}
    r = subprocess.run([PY, "-m", "bundles", "unpack", str(p), "--to", str(tmp_path / "again"), "--state",
                        str(state), *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not newer than v3" in r.stderr and not (tmp_path / "again").exists()
    r = subprocess.run([PY, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert r.returncode != 0  # the guard really blocks the heavy packages


# --- the appliance side: keys, trust, bundle export / inspect / verify / import --------------------------
@pytest.fixture
def model_home(train_home, cli, tmp_path, monkeypatch) -> Path:
    """train_home plus an imported tiny model `tiny@1`; a key passphrase in the environment."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key pass 1234")
    with artifact(train_home, train_home / "artifacts" / "tokenizers" / "handbook-bpe@1") as path:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    d = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    tok.save_pretrained(d)
    assert cli("--home", train_home, "train", "import", d, "--name", "tiny").code == 0
    return train_home


def test_keys_trust_and_bundles_through_the_cli(model_home, cli, tmp_path):
    from appliance import sealed

    h = model_home
    r = cli("--home", h, "--json", "keys", "generate", "--name", "site-a")
    assert r.code == 0, r.err
    assert oct((h / "keys" / "site-a.key").stat().st_mode & 0o777) == "0o600"
    assert "key pass" not in (h / "keys" / "site-a.key").read_text()
    pub = tmp_path / "site-a.pub"
    assert cli("--home", h, "keys", "export-public", "site-a", "--out", pub).code == 0
    assert [k["name"] for k in cli("--home", h, "--json", "keys", "list").json["keys"]] == ["site-a"]
    out = tmp_path / "tiny.bundle"
    r = cli("--home", h, "--json", "bundle", "export", "tiny@1", "--sign-key", "site-a", "--to", pub, "--out", out)
    assert r.code == 0 and r.json["version"] == 1 and r.json["encrypted_to"], r.err
    # not trusted yet: refused, and nothing landed
    r = cli("--home", h, "bundle", "import", out)
    assert r.code == 1 and "not trusted here" in r.err
    assert sorted(p.name for p in (h / "artifacts" / "models").iterdir()) == ["tiny@1"]
    assert cli("--home", h, "--json", "lineage", "tiny@2").code != 0
    r = cli("--home", h, "--json", "trust", "add", pub, "--name", "hq", "--kinds", "gguf")
    assert r.code == 0 and r.json["kinds"] == ["gguf"]
    assert "not for model bundles" in cli("--home", h, "bundle", "verify", out).err
    assert cli("--home", h, "trust", "remove", "hq").code == 0
    assert cli("--home", h, "trust", "add", pub, "--name", "hq", "--kinds", "model,gguf").code == 0
    info = cli("--home", h, "--json", "bundle", "inspect", out).json
    assert info["manifest"]["lineage"]["id"] == "tiny@1" and info["signer_trusted_as"] == "hq"
    assert cli("--home", h, "--json", "bundle", "verify", out).json["name"] == "tiny"
    r = cli("--home", h, "--json", "bundle", "import", out)
    assert r.code == 0, r.err
    d = r.json
    assert d["id"] == "tiny@2" and d["signer"] == "hq"
    sent = h / "artifacts" / "models" / "tiny@1"
    with artifact(h, sent) as a, artifact(h, d["path"]) as b:
        for name in sealed.sealed_names(sent):
            assert (b / name).read_bytes() == (a / name).read_bytes()
    tree = cli("--home", h, "--json", "lineage", "tiny@2").json["lineage"]
    assert tree["attrs"]["imported_from"] == "tiny@1" and tree["attrs"]["bundle"]["version"] == 1
    # the same release again is a replay: refused unless explicitly allowed, and then audited
    assert "not newer than v1" in cli("--home", h, "bundle", "import", out).err
    assert not [p.name for p in (h / "artifacts" / "models").iterdir() if p.name.startswith(".")]  # nothing left
    r = cli("--home", h, "--json", "bundle", "import", out, "--allow-downgrade")
    assert r.code == 0 and r.json["downgrade"] and r.json["id"] == "tiny@3"
    log = cli("--home", h, "--json", "audit", "log", "--action", "bundle.*").json["entries"]
    assert [e["action"] for e in log] == ["bundle.export", "bundle.import", "bundle.import"]
    assert [e["details"]["downgrade"] for e in log[1:]] == [False, True]
    # a GGUF travels with the sender's quality report, and runs here by its new id
    assert cli("--home", h, "quantize", "tiny@1", "--type", "f16", "--eval", "handbook@1").code == 0
    gb = tmp_path / "gguf.bundle"
    assert cli("--home", h, "bundle", "export", "tiny@1:f16", "--sign-key", "site-a", "--out", gb).code == 0
    r = cli("--home", h, "--json", "bundle", "import", gb)
    assert r.code == 0 and r.json["id"] == "tiny.f16@1", r.err
    listed = {x["id"]: x for x in cli("--home", h, "--json", "quantize", "--list").json["gguf"]}
    assert listed["tiny.f16@1"]["imported_from"] == "tiny@1:f16" and listed["tiny.f16@1"]["type"] == "f16"
    assert listed["tiny.f16@1"]["top1_agreement"] == listed["tiny@1:f16"]["top1_agreement"]
    assert cli("--home", h, "quantize", "--list").code == 0
    assert cli("--home", h, "generate", "tiny.f16@1", "The", "--max-tokens", "3").code == 0
    # a second export is the next version; a wrong key passphrase is one line
    r = cli("--home", h, "--json", "bundle", "export", "tiny@1", "--sign-key", "site-a", "--out", tmp_path / "v2")
    assert r.json["version"] == 2
    os.environ["APPLIANCE_KEY_PASSPHRASE"] = "wrong"
    r = cli("--home", h, "bundle", "export", "tiny@1", "--sign-key", "site-a", "--out", tmp_path / "v3")
    assert r.code == 1 and "wrong passphrase for key 'site-a'" in r.err and not (tmp_path / "v3").exists()


def test_a_dataset_travels_encrypted_and_lands_identical(model_home, cli, tmp_path):
    from appliance.train.config import DataConfig
    from appliance.train.data import chat_pairs
    from tests.conftest import open_vault

    h = model_home
    assert cli("--home", h, "keys", "generate", "--name", "site-a").code == 0
    pub = h / "keys" / "site-a.pub"
    out = tmp_path / "qa.bundle"
    r = cli("--home", h, "bundle", "export", "handbook-qa@1", "--sign-key", "site-a", "--out", out)
    assert r.code == 2 and "must be encrypted" in r.err and not out.exists()
    r = cli("--home", h, "--json", "bundle", "export", "handbook-qa@1", "--sign-key", "site-a", "--to", pub,
            "--out", out)
    assert r.code == 0, r.err
    with open_vault(h, read_only=True) as v:
        some_text = v.con.execute("SELECT instruction FROM data.t2_handbook_qa LIMIT 1").fetchone()[0]
    assert some_text.encode() not in out.read_bytes()  # no plaintext of vault data in the bundle
    assert cli("--home", h, "trust", "add", pub, "--name", "hq", "--kinds", "dataset").code == 0
    r = cli("--home", h, "--json", "bundle", "import", out)
    assert r.code == 0, r.err
    assert r.json["id"] == "handbook-qa@2" and r.json["records"] > 0
    a = cli("--home", h, "--json", "vault", "show", "handbook-qa@1").json
    b = cli("--home", h, "--json", "vault", "show", "handbook-qa@2").json
    assert a["content_hash"] == b["content_hash"] and a["splits"] == b["splits"]
    with open_vault(h, read_only=True) as v:  # the SFT pairs read the same from the imported tables
        cfg = DataConfig()
        assert list(chat_pairs(v.con, ["handbook-qa@2"], cfg)) == list(chat_pairs(v.con, ["handbook-qa@1"], cfg))
    tree = cli("--home", h, "--json", "lineage", "handbook-qa@2").json["lineage"]
    assert tree["attrs"]["imported_from"] == "handbook-qa@1" and tree["attrs"]["bundle"]["signer"] == "hq"
