"""Sealed artifacts: files under HOME/artifacts are encrypted, bound to their place, and opened in memory only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from appliance import sealed
from appliance.memfiles import MemDir, MemFile
from bundles import stream

CHUNK = stream.CHUNK


@pytest.fixture
def store(tmp_path):
    art = tmp_path / "home" / "artifacts"
    art.mkdir(parents=True)
    (art.parent / "keyring.json").write_text("{}")  # a home: what lies in its artifacts must be sealed
    s = sealed.register(sealed.Store(art, tmp_path / "home" / "tmp", sealed.GivenKeys(
        {"models/a@1": os.urandom(32), "models/b@1": os.urandom(32), "gguf/a@1-q8_0": os.urandom(32)})))
    yield s
    sealed.unregister(s)


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """A tiny base of a family (built once per family for this file)."""
    from appliance import sample_bases

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = sample_bases.build(family, tmp_path_factory.mktemp(family) / "base",
                                               ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
        return built[family]
    return get


def _plain_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".sealed"))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 64 * CHUNK + 7])
def test_every_size_comes_back_exactly(store, size):
    data = os.urandom(size)
    dest = store.root / "models/a@1"
    store.write_dir(dest, {"w.bin": data, "sub/c.json": b"{}"})
    assert _plain_files(store.root) == []
    assert (dest / "w.bin.sealed").stat().st_size == len(sealed.MAGIC) + sealed.NONCE + stream.sealed_size(size)
    with sealed.opened(dest) as p:
        assert (p / "w.bin").read_bytes() == data and (p / "sub/c.json").read_bytes() == b"{}"
        assert Path(p).parent == store.tmp and all(q.is_symlink() for q in Path(p).rglob("*") if not q.is_dir())
    assert not any(store.tmp.iterdir())  # the links are gone with the in-memory files


def test_an_altered_cut_extended_moved_or_renamed_file_does_not_open(store):
    data = os.urandom(3 * CHUNK + 5)
    a = store.root / "models/a@1"
    store.write_dir(a, {"w.bin": data, "x.bin": data})
    f = a / "w.bin.sealed"
    raw = f.read_bytes()

    def refused(blob: bytes | None = None, where: Path = a, name: str = "w.bin") -> str:
        if blob is not None:
            f.write_bytes(blob)
        with pytest.raises(sealed.SealedError) as e:
            store.read_bytes(where / name)
        f.write_bytes(raw)
        return str(e.value)

    flip = bytearray(raw)
    flip[len(raw) // 2] ^= 1
    assert "chunk 1 does not authenticate" in refused(bytes(flip))
    assert "cut or extended" in refused(raw[:-1]) or "does not authenticate" in refused(raw[:-1])
    assert "does not authenticate" in refused(raw[:len(raw) - 5 - stream.TAG])  # cut at a chunk boundary
    assert refused(raw + b"x")
    moved = bytearray(raw)  # chunks 0 and 1 swapped
    c = stream.CHUNK + stream.TAG
    h = len(sealed.MAGIC) + sealed.NONCE
    moved[h:h + c], moved[h + c:h + 2 * c] = raw[h + c:h + 2 * c], raw[h:h + c]
    assert "does not authenticate" in refused(bytes(moved))
    # the same file under another name, or in another artifact (even one whose key this process holds)
    shutil.copy(f, a / "x.bin.sealed")
    assert "does not authenticate" in refused(name="x.bin")
    b = store.root / "models/b@1"
    b.mkdir()
    shutil.copy(f, b / "w.bin.sealed")
    assert "does not authenticate" in refused(where=b)
    assert store.read_bytes(a / "w.bin") == data


def test_a_process_without_the_key_opens_nothing(store, tmp_path):
    store.write_dir(store.root / "models/a@1", {"w.bin": b"secret weights"})
    sealed.unregister(store)
    try:
        with pytest.raises(sealed.SealedError, match="vault is not open"), sealed.opened(store.root / "models/a@1"):
            pass
        other = sealed.Store(store.root, store.tmp, sealed.GivenKeys({}))
        with pytest.raises(sealed.SealedError, match="no key"):
            other.read_bytes(store.root / "models/a@1/w.bin")
    finally:
        sealed.register(store)


def test_a_library_that_writes_its_own_file_is_caught_and_the_file_shredded(store):
    with MemDir(store.tmp) as d:
        d.new("config.json")
        Path(d.path, "config.json").write_text("{}")  # through the link: into memory
        (Path(d.path) / "stray.bin").write_bytes(b"plaintext")
        with pytest.raises(Exception, match="stray.bin as a file on disk"):
            d.check()
        assert not (Path(d.path) / "stray.bin").exists()


def test_a_memfile_has_no_name_on_disk_and_opens_by_its_path():
    with MemFile.of("model.gguf", b"GGUF in memory") as f:
        assert f.path.startswith("/proc/") and os.readlink(f.path).startswith("/memfd:model.gguf")
        assert open(f.path, "rb").read() == b"GGUF in memory"  # what llama.cpp and safetensors do with it
        path = f.path
    assert not os.path.exists(path)  # closed: gone, nothing to clean up


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_a_model_saved_in_memory_loads_as_its_save_pretrained_twin(store, tmp_path, family, base_of):
    """save_model under the artifacts serializes weights itself (safetensors replaces a file it saves to);
    what it seals must load exactly like what save_pretrained writes."""
    import torch
    from transformers import AutoModelForCausalLM

    from appliance.train.model import load_tokenizer, save_model, tree_hash

    src = base_of(family)
    tok = load_tokenizer(src, chat=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    plain, dest = tmp_path / "plain", store.root / "models/a@1"
    save_model(model, tok, plain, {"id": "a@1"})
    save_model(model, tok, dest, {"id": "a@1"})
    assert _plain_files(store.root) == []
    assert sorted(sealed.sealed_names(dest)) == sorted(p.name for p in plain.iterdir())
    assert tree_hash(dest) == tree_hash(plain)  # the same bytes, file for file
    x = torch.tensor([[1, 5, 9, 2, 7]])
    with sealed.opened(dest) as p:
        again = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    twin = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32)
    assert torch.equal(again(x).logits, twin(x).logits)
    assert {**again.config.to_dict(), "_name_or_path": ""} == {**twin.config.to_dict(), "_name_or_path": ""}
    back = load_tokenizer(dest)
    assert back.chat_template == tok.chat_template and back("a fox").input_ids == tok("a fox").input_ids


def test_vault_check_opens_every_artifact_and_vault_seal_seals_an_older_homes(home, cli):
    from tests.conftest import artifact_bytes, open_vault

    with open_vault(home) as v:
        v.store.write_dir(v.home.artifacts / "models" / "new@1", {"config.json": b'{"a": 1}', "w.bin": b"x" * 5000})
    old = home / "artifacts" / "tokenizers" / "old@1"  # what an appliance before sealing left
    old.mkdir(parents=True)
    (old / "tokenizer.json").write_text('{"vocab": "in the clear"}')
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code == 0 and r.json["artifacts"] == 1 and r.json["unsealed"] == [
        "tokenizers/old@1: 1 file(s) in the clear (tokenizer.json)"]
    r = cli("--home", home, "--json", "vault", "seal")
    assert r.code == 0 and r.json["sealed"] == ["tokenizers/old@1"]
    assert [p.name for p in old.iterdir()] == ["tokenizer.json.sealed"]
    assert artifact_bytes(home, old / "tokenizer.json") == b'{"vocab": "in the clear"}'
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code == 0 and r.json["artifacts"] == 2 and r.json["unsealed"] == []
    f = home / "artifacts" / "models" / "new@1" / "w.bin.sealed"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40  # one bit of a weight on the stolen-and-returned disk
    f.write_bytes(bytes(raw))
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code != 0 and any("models/new@1" in p and "w.bin.sealed does not open" in p for p in r.json["problems"])
    assert "vault.seal" in {e["action"] for e in cli("--home", home, "--json", "audit", "log").json["entries"]}
    r = cli("--home", home, "vault", "rekey")  # the artifacts' keys move with the database: nothing rewritten
    assert r.code == 0, r.err
    assert artifact_bytes(home, old / "tokenizer.json") == b'{"vocab": "in the clear"}'
    r = cli("--home", home, "eval", "plot", "any@1", "--out", home / "artifacts" / "plot.png")
    assert r.code == 2 and "inside the home" in r.err and not (home / "artifacts" / "plot.png").exists()


def test_a_checkpoint_is_sealed_as_it_is_written_and_a_shard_moved_to_another_step_does_not_open(store):
    import torch

    from appliance.train import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    opt.step()
    root = store.root / "runs" / "r@1" / "checkpoints"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    a = checkpoint.save(root, 1, model, opt, {"run": "r@1"}, True, 3)
    b = checkpoint.save(root, 2, model, opt, {"run": "r@1"}, True, 3)
    assert _plain_files(store.root) == [] and not list(store.root.rglob(".step-*"))  # no temp dir left behind
    assert checkpoint.read_state(b)["step"] == 2 and [p.name for p in checkpoint.all_checkpoints(root)] == [
        "step-00000001", "step-00000002"]
    got = checkpoint.read_weights(a)
    assert torch.equal(got["0.weight"], model[0].weight.detach())
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    checkpoint.load(b, fresh, fresh_opt)
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), model.state_dict().values()))
    shard = next(b.glob("*.distcp.sealed"))
    shutil.copy(next(a.glob("*.distcp.sealed")), shard)  # the same bytes, under step 2's name
    with pytest.raises(Exception, match="does not open"):
        checkpoint.read_weights(b)


def test_a_lora_adapter_saved_in_memory_is_what_peft_saves(store, tmp_path, base_of):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from appliance.train.model import load_tokenizer, save_model, tree_hash

    src = base_of("llama3")
    tok = load_tokenizer(src)
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain, dest = tmp_path / "plain", store.root / "models/a@1"
    save_model(model, tok, plain, {"id": "a@1"})
    save_model(model, tok, dest, {"id": "a@1"})
    names = set(sealed.sealed_names(dest))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert names <= {p.name for p in plain.iterdir()}  # peft adds a README model card; nothing else differs
    x = torch.tensor([[1, 5, 9, 2, 7]])
    with sealed.opened(dest) as d:
        again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32), d)
        same = {n: (Path(d) / n).read_bytes() == (plain / n).read_bytes() for n in names}
    assert all(same.values()), same
    assert torch.equal(again(x).logits, model(x).logits)
    assert tree_hash(dest)


def test_nothing_in_the_clear_under_the_artifacts_is_ever_loaded_and_a_planted_checkpoint_does_not_run(store,
                                                                                                         tmp_path):
    """A file planted in the clear where only sealed ones belong is refused by every loader: a checkpoint's
    .metadata is unpickled by torch, so loading a planted one would run its code."""
    import pickle

    from appliance.train import checkpoint

    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(pwned), "w"))

    root = store.root / "runs" / "r@1" / "checkpoints"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    planted = root / "step-99999999"
    planted.mkdir(parents=True)
    (planted / "state.json").write_text('{"step": 99999999}')
    (planted / ".metadata").write_bytes(pickle.dumps(Payload()))
    assert checkpoint.latest(root) is None  # not a checkpoint there: its state is not sealed
    with pytest.raises(sealed.SealedError, match="missing or in the clear"):
        checkpoint.read_state(planted)
    with pytest.raises(sealed.SealedError):
        checkpoint.read_weights(planted)
    assert not pwned.exists()
    plain = store.root / "models" / "b@1"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text("{}")
    with pytest.raises(sealed.SealedError, match="in the clear inside the home's artifacts"), sealed.opened(plain):
        pass
    with pytest.raises(sealed.SealedError, match="in the clear"):
        sealed.read_bytes(plain / "config.json")


def test_a_save_into_a_homes_artifacts_with_no_store_open_refuses_instead_of_writing_in_the_clear(store, base_of):
    from appliance.train.model import load_tokenizer, save_model

    tok = load_tokenizer(base_of("qwen2"))
    sealed.unregister(store)
    try:
        with pytest.raises(sealed.SealedError, match="vault is not open"):
            save_model(type("M", (), {})(), tok, store.root / "models" / "a@1", {})
    finally:
        sealed.register(store)
    assert not (store.root / "models" / "a@1").exists() and _plain_files(store.root) == []


def test_a_sparse_file_claiming_gigabytes_is_refused_before_anything_is_allocated(store):
    f = store.root / "models" / "a@1" / "w.bin.sealed"
    f.parent.mkdir(parents=True)
    with open(f, "wb") as out:
        out.write(sealed.MAGIC + os.urandom(sealed.NONCE))
        out.truncate(2 << 30)  # 2 GiB of holes
    with pytest.raises(sealed.SealedError, match="sparse"):
        store.read_bytes(store.root / "models" / "a@1" / "w.bin")


def test_a_closed_vault_opens_no_artifact_a_read_only_one_makes_no_key_and_a_killed_process_leftovers_go(home):
    from tests.conftest import open_vault

    with open_vault(home) as v:
        v.store.write_dir(v.home.artifacts / "models" / "a@1", {"w.bin": b"weights"})
        stale = v.home.tmp / ".mem-999999999-x"  # a process that is gone
        stale.mkdir()
        os.symlink("/proc/999999999/fd/3", stale / "model.safetensors")
    v.close()
    with pytest.raises(sealed.SealedError, match="vault is not open"):
        sealed.read_bytes(home / "artifacts" / "models" / "a@1" / "w.bin")
    with pytest.raises(Exception, match="was closed"), v.session():
        pass
    with open_vault(home):  # a writable open sweeps the dead process's links
        assert not stale.exists()
    with open_vault(home, read_only=True) as r:
        assert sealed.read_bytes(home / "artifacts" / "models" / "a@1" / "w.bin") == b"weights"
        with pytest.raises(sealed.SealedError, match="read-only"):
            r.store.write_dir(home / "artifacts" / "models" / "b@1", {"w.bin": b"x"})
        assert r.read_only  # refusing did not leave it attached for writing


def test_model_export_into_the_home_is_refused(home, cli):
    r = cli("--home", home, "model", "export", "nothing@1", "--out", home / "tmp" / "x")
    assert r.code != 0
