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
    assert "cut or extended" in refused(raw[:len(raw) - 5 - stream.TAG])  # cut at a chunk boundary
    assert refused(raw + b"x")
    moved = bytearray(raw)  # chunks 0 and 1 swapped
    c = stream.CHUNK + stream.TAG
    h = len(sealed.MAGIC) + sealed.NONCE
    moved[h:h + c], moved[h + c:h + 2 * c] = raw[h + c:h + 2 * c], raw[h:h + c]
    assert "does not authenticate" in refused(bytes(moved))
    # the same file under another name, or in another artifact (even one whose key this process holds)
    shutil.copy(f, a / "x.bin.sealed")
    assert "x.bin is not the copy last written" in refused(name="x.bin")  # its manifest names another write
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
    assert sorted(p.name for p in old.iterdir()) == [".appliance-manifest.sealed", "tokenizer.json.sealed"]
    assert artifact_bytes(home, old / "tokenizer.json") == b'{"vocab": "in the clear"}'
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code == 0 and r.json["artifacts"] == 2 and r.json["unsealed"] == []
    assert r.json["unmanifested"] == []
    with open_vault(home) as v:  # as one made before manifests: its key recorded before schema 2, no manifest
        v.con.execute("UPDATE artifact_keys SET manifested = NULL WHERE artifact = 'models/new@1'")
    (home / "artifacts" / "models" / "new@1" / ".appliance-manifest.sealed").unlink()
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code == 0 and r.json["artifacts"] == 2 and r.json["unmanifested"] == ["models/new@1"]
    assert artifact_bytes(home, home / "artifacts" / "models" / "new@1" / "config.json") == b'{"a": 1}'  # opens
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
    with pytest.raises(Exception, match="does not match its manifest"):
        checkpoint.read_weights(b)
    (b / (sealed.MANIFEST + sealed.SUFFIX)).unlink()  # without the manifest, the name binding still refuses it
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


# --- manifests: the set of files of a sealed directory, and which write each one is -------------------------
def _refused(store, path: Path) -> str:
    """The one line a load of `path` (a sealed directory) fails with."""
    with pytest.raises(sealed.SealedError) as e, sealed.opened(path):
        pass
    msg = str(e.value)
    assert "\n" not in msg and str(store.tmp) not in msg and ".mem-" not in msg  # the artifact, never a temp path
    return msg


def test_a_file_removed_added_or_put_back_from_an_earlier_write_does_not_open(store):
    a = store.root / "models/a@1"
    store.write_dir(a, {"model.safetensors": b"weights of the first write", "config.json": b"{}",
                        "extra.json": b'{"first": true}'})
    first = {n: (a / n).read_bytes() for n in ("model.safetensors.sealed", "extra.json.sealed")}
    store.write_dir(a, {"model.safetensors": b"weights of the second write", "config.json": b"{}"})
    assert store.check(a) is True
    with sealed.opened(a) as p:
        assert (p / "model.safetensors").read_bytes() == b"weights of the second write"
    now = (a / "model.safetensors.sealed").read_bytes()

    (a / "model.safetensors.sealed").write_bytes(first["model.safetensors.sealed"])  # rolled back
    msg = _refused(store, a)
    assert msg.startswith("the artifact models/a@1 does not match its manifest: model.safetensors is not the copy "
                          "last written") and "restore the artifact from a backup" in msg
    with pytest.raises(sealed.SealedError, match="models/a@1 does not match its manifest"):
        store.read_bytes(a / "model.safetensors")
    with pytest.raises(sealed.SealedError, match="models/a@1"):
        store.check(a)
    (a / "model.safetensors.sealed").write_bytes(now)

    (a / "extra.json.sealed").write_bytes(first["extra.json.sealed"])  # a file of an earlier write, added
    assert "the artifact models/a@1 does not match its manifest: extra.json was added" in _refused(store, a)
    with pytest.raises(sealed.SealedError, match="extra.json was added"):
        store.read_bytes(a / "extra.json")
    (a / "extra.json.sealed").unlink()

    (a / "config.json.sealed").unlink()  # removed
    assert "the artifact models/a@1 does not match its manifest: config.json is missing" in _refused(store, a)
    with pytest.raises(sealed.SealedError, match="config.json is missing"):
        store.verify(a) if store.check(a) else None


def test_a_manifest_moved_from_another_artifact_or_put_back_from_an_earlier_write_is_refused(store):
    a, b = store.root / "models/a@1", store.root / "models/b@1"
    store.write_dir(a, {"w.bin": b"one"})
    old_manifest = (a / ".appliance-manifest.sealed").read_bytes()
    old_w = (a / "w.bin.sealed").read_bytes()
    store.write_dir(a, {"w.bin": b"two"})
    store.write_dir(b, {"w.bin": b"bee"})
    m = sealed.MANIFEST + sealed.SUFFIX
    (b / m).write_bytes((a / m).read_bytes())
    assert "manifest of the artifact models/b@1" in _refused(store, b)
    (a / m).write_bytes(old_manifest)  # the earlier manifest alone: the file is the later write's
    assert "w.bin is not the copy last written" in _refused(store, a)
    (a / "w.bin.sealed").write_bytes(old_w)  # both put back: the whole artifact as it was (see docs/VAULT.md)
    with sealed.opened(a) as p:
        assert (p / "w.bin").read_bytes() == b"one"


def test_an_artifact_made_before_manifests_opens_and_says_so(store):
    a = store.root / "models/a@1"
    store.write_dir(a, {"w.bin": b"older", "sub/c.json": b"{}"})
    (a / (sealed.MANIFEST + sealed.SUFFIX)).unlink()
    store.keys.with_manifests.discard("models/a@1")  # its key not marked as written with manifests
    assert store.check(a) is False
    with sealed.opened(a) as p:
        assert (p / "w.bin").read_bytes() == b"older"
    assert store.read_bytes(a / "sub/c.json") == b"{}"
    store.write_file(a / "report.json", b"{}")  # a later file beside them: it stays as it was, unmanifested
    assert store.check(a) is False and not (a / (sealed.MANIFEST + sealed.SUFFIX)).exists()


def test_a_file_rewritten_in_a_run_directory_cannot_be_rolled_back(store):
    run = store.root / "runs/r@1"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    store.write_file(run / "recipe.json", b'{"lr": 1}')
    first = (run / "recipe.json.sealed").read_bytes()
    store.write_file(run / "recipe.json", b'{"lr": 2}')
    store.write_file(run / "report.json", b"{}")
    assert store.check(run) is True and store.read_bytes(run / "recipe.json") == b'{"lr": 2}'
    now = (run / "recipe.json.sealed").read_bytes()
    (run / "recipe.json.sealed").write_bytes(first)
    with pytest.raises(sealed.SealedError, match="runs/r@1 does not match its manifest: recipe.json is not the copy"):
        store.read_bytes(run / "recipe.json")
    (run / "recipe.json.sealed").write_bytes(now)
    (run / "report.json.sealed").unlink()
    with pytest.raises(sealed.SealedError, match="report.json is missing"):
        store.check(run)


def test_a_write_that_dies_between_file_and_manifest_leaves_either_copy_opening(store, monkeypatch):
    run = store.root / "runs/r@1"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    store.write_file(run / "recipe.json", b"old")
    calls = []
    real = sealed.seal_manifest

    def dies_after_the_first(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the rename, before the final manifest
        return real(*a, **kw)

    monkeypatch.setattr(sealed, "seal_manifest", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        store.write_file(run / "recipe.json", b"new")
    monkeypatch.undo()
    assert store.read_bytes(run / "recipe.json") == b"new" and store.check(run)


def _tiny_training_state():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    opt.step()
    return model, opt


def test_a_checkpoint_shard_or_state_put_back_from_an_earlier_write_of_the_same_step_does_not_load(store):
    import torch

    from appliance.train import checkpoint

    model, opt = _tiny_training_state()
    root = store.root / "runs" / "r@1" / "checkpoints"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    store.write_file(store.root / "runs/r@1/recipe.json", b"{}")  # the run's own manifest, as a run starts
    step = checkpoint.save(root, 2, model, opt, {"run": "r@1", "loss": 9.0}, True, 3)
    earlier = {p.name: p.read_bytes() for p in step.iterdir()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    step = checkpoint.save(root, 2, model, opt, {"run": "r@1", "loss": 1.0}, True, 3)  # step 2 again (a resume)
    assert store.check(store.root / "runs/r@1") is True
    assert torch.equal(checkpoint.read_weights(step)["0.weight"], model[0].weight.detach())

    shard = next(n for n in earlier if n.endswith(".distcp.sealed"))
    now = (step / shard).read_bytes()
    (step / shard).write_bytes(earlier[shard])  # the earlier weights, sealed under the same name and key
    fresh, fresh_opt = _tiny_training_state()
    with pytest.raises(sealed.SealedError, match=r"runs/r@1 does not match its manifest: checkpoints/step-00000002/"
                                                 r"__0_0.distcp is not the copy last written"):
        checkpoint.load(step, fresh, fresh_opt)
    (step / shard).write_bytes(now)

    state_now = (step / "state.json.sealed").read_bytes()
    (step / "state.json.sealed").write_bytes(earlier["state.json.sealed"])  # the step's earlier loss and position
    with pytest.raises(sealed.SealedError, match="state.json is not the copy last written"):
        checkpoint.read_state(step)
    (step / "state.json.sealed").write_bytes(state_now)
    assert checkpoint.read_state(step)["loss"] == 1.0

    extra = step / "__1_0.distcp.sealed"  # a second rank's shard, as an earlier write with two ranks left it
    sealed.seal_file(store.keys.keys["runs/r@1"], "runs/r@1", "checkpoints/step-00000002/__1_0.distcp", b"x", extra)
    with pytest.raises(sealed.SealedError, match="__1_0.distcp was added"):
        checkpoint.read_weights(step)
    extra.unlink()

    (step / "rng.pt.sealed").unlink()
    with pytest.raises(sealed.SealedError, match="rng.pt is missing"):
        checkpoint.read_weights(step)
    (step / "rng.pt.sealed").write_bytes(earlier["rng.pt.sealed"])
    with pytest.raises(sealed.SealedError, match="rng.pt is not the copy last written"):
        checkpoint.load(step, fresh, fresh_opt)


def test_pruned_checkpoints_leave_every_manifest_true(store):
    from appliance.train import checkpoint

    model, opt = _tiny_training_state()
    run = store.root / "runs" / "r@1"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    store.write_file(run / "recipe.json", b"{}")
    for step in (1, 2, 3):
        checkpoint.save(run / "checkpoints", step, model, opt, {"run": "r@1"}, True, 2)
    assert [p.name for p in checkpoint.all_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert store.check(run) is True
    # a run written whole (as `vault seal` writes an older one): its checkpoints still get manifests of their own
    files = {n: store.read_bytes(run / n) for n in sealed.sealed_names(run)}
    shutil.rmtree(run)
    store.write_dir(run, files)
    checkpoint.save(run / "checkpoints", 4, model, opt, {"run": "r@1"}, True, 2)
    assert [p.name for p in checkpoint.all_checkpoints(run / "checkpoints")] == ["step-00000003", "step-00000004"]
    assert store.check(run) is True and checkpoint.read_state(run / "checkpoints/step-00000003")["step"] == 3


def test_a_prune_that_dies_part_way_leaves_every_checkpoint_whole(store, monkeypatch):
    """A pruned checkpoint is set aside under a hidden name before it is deleted: a crash part-way through the
    deletion never leaves a checkpoint directory missing some of its files (which would fail every check)."""
    from appliance.train import checkpoint

    model, opt = _tiny_training_state()
    run = store.root / "runs" / "r@1"
    store.keys.keys["runs/r@1"] = os.urandom(32)
    store.write_file(run / "recipe.json", b"{}")
    for step in (1, 2):
        checkpoint.save(run / "checkpoints", step, model, opt, {"run": "r@1"}, True, 2)
    real = shutil.rmtree

    def dies_half_way(path, *a, **k):  # one file deleted, then the power goes
        next(p for p in Path(path).rglob("*.sealed")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run / "checkpoints", 3, model, opt, {"run": "r@1"}, True, 2)  # prunes step 1
    monkeypatch.setattr(shutil, "rmtree", real)
    assert [p.name for p in checkpoint.all_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert store.check(run) is True and checkpoint.read_state(checkpoint.latest(run / "checkpoints"))["step"] == 3
