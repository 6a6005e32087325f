"""`train import` stages the base it checks in memory: no plaintext copy of the model lands in the home, not even
for the moment it is checked and its tokenizer rewritten (a directory, and a GGUF dequantized back)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance import sealed
from tests.test_gguf_import import FAMILIES, _export, build, tok_dir  # noqa: F401  (tok_dir is a fixture)


def _plain_copies(home: Path, marks: list[bytes]) -> list[str]:
    """Regular files under the home (links into memory aside) holding any of `marks`."""
    found = []
    for dirpath, _, filenames in os.walk(home):
        for n in filenames:
            p = Path(dirpath, n)
            if p.is_symlink() or not p.is_file():
                continue
            data = p.read_bytes()
            if any(m in data for m in marks):
                found.append(str(p.relative_to(home)))
    return found


def _spy_on_sealing(monkeypatch, home: Path, marks: list[bytes]) -> list[list[str]]:
    """Walk the home at the moment the staged import is sealed (when it is all there at once)."""
    seen: list[list[str]] = []
    real = sealed.Store.write_dir

    def write_dir(self, dest, files):
        seen.append(_plain_copies(home, marks))
        return real(self, dest, files)

    monkeypatch.setattr(sealed.Store, "write_dir", write_dir)
    return seen


def _marks(src: Path) -> list[bytes]:
    """Bytes only a copy of the base holds: each weight file's header, the tokenizer's vocabulary."""
    marks = [p.read_bytes()[:256] for p in src.glob("*.safetensors")]
    return marks + [(src / "tokenizer.json").read_bytes()[1000:1256]]


def test_a_directory_import_never_puts_the_base_in_the_clear_under_the_home(train_home, cli, tmp_path,
                                                                           monkeypatch):
    from appliance import sample_bases

    src = sample_bases.build("llama3", tmp_path / "base", ["the quick brown fox jumps over the lazy dog"] * 20,
                             vocab_size=300)
    marks = _marks(src)
    assert len(marks) >= 2 and all(len(m) == 256 for m in marks)
    seen = _spy_on_sealing(monkeypatch, train_home, marks)
    r = cli("--home", train_home, "--json", "train", "import", src, "--name", "site")
    assert r.code == 0, r.err
    assert seen == [[]] and _plain_copies(train_home, marks) == []
    assert not [p for p in (train_home / "tmp").rglob("*") if p.name.startswith((".import-", ".mem-"))]
    assert (train_home / "artifacts" / "models" / "site@1" / "model.safetensors.sealed").is_file()


@pytest.mark.slow
def test_a_gguf_import_dequantizes_into_memory(tok_dir, train_home, cli, tmp_path, monkeypatch):  # noqa: F811
    cls, kw = FAMILIES["qwen2"]
    src = build(tok_dir, tmp_path / "q2", cls, **kw)
    gguf = _export(src, tmp_path / "q2-f32.gguf")
    seen = []
    real = sealed.Store.write_dir

    def write_dir(self, dest, files):  # the f32 weights as safetensors: their header names the tensors
        staged = [p for p in Path(train_home).rglob("*") if p.is_file() and not p.is_symlink()
                  and not p.name.endswith(sealed.SUFFIX) and p.suffix in (".safetensors", ".json", ".jinja")
                  and p.parent != train_home]  # the keyring (no secret in the clear) sits at the top
        seen.append(staged)
        return real(self, dest, files)

    monkeypatch.setattr(sealed.Store, "write_dir", write_dir)
    r = cli("--home", train_home, "--json", "train", "import", gguf, "--name", "outside")
    assert r.code == 0, r.err
    assert seen == [[]]
    assert (train_home / "artifacts" / "models" / "outside@1" / "model.safetensors.sealed").is_file()
