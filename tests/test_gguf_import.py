"""`appliance train import FILE.gguf`: a GGUF dequantized back into a transformers model, proven three ways.

For every family the exporter writes (test_gguf_arch's tiny random models): the f32 GGUF comes back with
the very same tensors as the source directory (Q/K un-permuted, Gemma's +1 taken off, Llama 3's RoPE
parameters recovered from `rope_freqs`); the importer's own check against llama.cpp passes; a quantized file
is imported through the CLI and recorded in lineage. A mapping error is caught by that check, and what
cannot be imported is refused in one line with nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from appliance.quantize import gguf_export, gguf_import, llama
from appliance.quantize import types as qtypes
from appliance.quantize.safetensors import Weights
from appliance.quantize.types import QuantizeError
from tests.test_gguf_arch import FAMILIES, build, tok_dir  # noqa: F401  (tok_dir is a fixture)


def _export(d, out):
    gguf_export.write(d, out, {"id": d.name, "name": d.name})
    return out


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_f32_gguf_comes_back_as_the_same_tensors(tok_dir, tmp_path, fam):  # noqa: F811
    cls, kw = FAMILIES[fam]
    src = build(tok_dir, tmp_path / fam, cls, **kw)
    gguf = _export(src, tmp_path / f"{fam}.gguf")
    out = tmp_path / "back"
    out.mkdir()
    figures = gguf_import.convert(gguf, out)
    assert figures["top1_agreement"] == 1.0 and figures["max_logit_diff"] < 1e-2, figures
    a, b = Weights(src), Weights(out)
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings")
    names = {n for n in a.names() if not (tied and n == "lm_head.weight")}
    assert set(b.names()) == names
    for n in names:  # bit for bit, but Gemma's norms: w + 1 - 1 rounds in f32
        if fam == "gemma2" and "norm" in n:
            np.testing.assert_allclose(a.get(n), b.get(n), rtol=0, atol=1e-6, err_msg=n)
        else:
            assert np.array_equal(a.get(n), b.get(n)), n
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == json.loads((src / "config.json").read_text())["architectures"] or fam == "mistral"
    if fam == "llama3":  # recovered from the rope_freqs tensor
        assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_parameters"]["factor"] == 8.0
    # the rebuilt tokenizer is the source's on text, and exports again to the same llama.cpp family
    from transformers import AutoTokenizer

    text = "Valve V-203 closed at 06:40; pressure 3.5 bar.\n\tcrew: 12"
    assert (AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)["input_ids"]
            == AutoTokenizer.from_pretrained(str(src))(text, add_special_tokens=False)["input_ids"])


def test_a_mapping_error_is_caught_by_the_check(tok_dir, tmp_path, monkeypatch):  # noqa: F811
    """Skip the Q/K un-permutation: the model loads and runs, and the check against llama.cpp refuses it."""
    cls, kw = FAMILIES["llama3"]
    gguf = _export(build(tok_dir, tmp_path / "l3", cls, **kw), tmp_path / "l3.gguf")
    monkeypatch.setattr(gguf_import, "unpermute_qk", lambda w, n_head: w)
    out = tmp_path / "back"
    out.mkdir()
    with pytest.raises(QuantizeError, match="computes differently from llama.cpp"):
        gguf_import.convert(gguf, out)


def test_cli_imports_a_quantized_gguf_into_lineage(tok_dir, tmp_path, train_home, cli):  # noqa: F811
    cls, kw = FAMILIES["qwen2"]
    f32 = _export(build(tok_dir, tmp_path / "q2", cls, **kw), tmp_path / "q2-f32.gguf")
    q8 = tmp_path / "site-qwen2-q8_0.gguf"
    llama.quantize(f32, q8, qtypes.get("q8_0"))
    r = cli("--home", train_home, "--json", "train", "import", q8, "--name", "outside")
    assert r.code == 0, r.err
    d = r.json
    assert d["id"] == "outside@1" and d["source_format"] == "gguf" and d["architectures"] == ["Qwen2ForCausalLM"]
    g = d["base"]["gguf"]
    assert g["quantized"] and g["tensor_types"] == ["Q8_0"] and g["top1_agreement"] >= 0.9
    assert d["base"]["files"] == {q8.name: __import__("appliance.home", fromlist=["x"]).file_sha256(q8)}
    node = cli("--home", train_home, "--json", "lineage", "outside@1").json["lineage"]
    assert node["attrs"]["base"]["format"] == "gguf"
    human = cli("--home", train_home, "train", "import", q8, "--name", "outside")
    assert human.code == 0 and "top-1 agreement" in human.out and "outside@2" in human.out
    # the import is a model like any other: it exports again
    r = cli("--home", train_home, "--json", "quantize", "outside@1", "--type", "f32", "--eval", "handbook@1")
    assert r.code == 0, r.err
    assert r.json["quality"]["tokenizer_hard_agreed"] == r.json["quality"]["tokenizer_hard_strings"]


@pytest.mark.parametrize("what,expect", [
    ("vocab", "holds a vocabulary only"),
    ("text", "neither a model directory nor a GGUF file"),
    ("truncated", "truncated or corrupt GGUF"),
    ("moe", "mixture-of-experts GGUF"),
    ("arch", "GGUF architecture 'bert' cannot be imported"),
])
def test_refusals_are_one_line_and_write_nothing(vocab_dir, tok_dir, tmp_path, train_home, cli, what, expect):  # noqa: F811
    import gguf as gg

    path = tmp_path / f"{what}.gguf"
    if what == "vocab":
        shutil.copy(vocab_dir / "ggml-vocab-llama-spm.gguf", path)
    elif what == "text":
        path.write_text("not a model\n")
    elif what == "truncated":
        cls, kw = FAMILIES["qwen2"]
        full = _export(build(tok_dir, tmp_path / "q2", cls, **kw), tmp_path / "full.gguf")
        path.write_bytes(full.read_bytes()[:-4096])
    else:
        wr = gg.GGUFWriter(str(path), "llama" if what == "moe" else "bert")
        wr.add_block_count(1)
        if what == "moe":
            wr.add_expert_count(8)
        wr.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
    r = cli("--home", train_home, "train", "import", path, "--name", "bad")
    assert r.code != 0 and expect in r.err, r.err
    assert len([ln for ln in r.err.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in r.err
    models = train_home / "artifacts" / "models"
    assert not models.exists() or not any(p.name.startswith(("bad@", ".bad@")) for p in models.iterdir())


def test_files_beside_the_gguf_are_not_read(tok_dir, tmp_path):  # noqa: F811
    """A tokenizer_config.json next to the GGUF (naming another tokenizer class) does not change the import."""
    cls, kw = FAMILIES["qwen2"]
    gguf = _export(build(tok_dir, tmp_path / "q2", cls, **kw), tmp_path / "drop" / "m.gguf") if (
        tmp_path / "drop").mkdir() is None else None
    (tmp_path / "drop" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    out = tmp_path / "back"
    out.mkdir()
    assert gguf_import.convert(gguf, out)["top1_agreement"] == 1.0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"


def _rewrite(src, dst, kv=None, tensors=None):
    """A copy of GGUF `src` with some keys replaced and some tensors changed, as a hostile file would be."""
    import gguf as gg

    r = gg.GGUFReader(str(src))
    w = gg.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in (kv or {}):
            continue
        vt = f.types[0]
        w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1] if vt == gg.GGUFValueType.ARRAY else None)
    for name, (value, vt) in (kv or {}).items():
        w.add_key_value(name, value, vt)
    for t in r.tensors:
        data = np.array(t.data)
        w.add_tensor(t.name, (tensors or {}).get(t.name, lambda a: a)(data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _nan_row(a):
    a = a.copy()
    a[0, :] = np.nan
    return a


@pytest.mark.parametrize("what,expect", [
    ("nan", "holds NaN or Inf"),  # NaN logits would compare equal on argmax and pass a NaN-blind check
    ("kv_heads", "do not divide"),  # llama.cpp would abort inside the process
    ("rot", "rotates 8 of 16 head dimensions"),  # likewise
    ("linear", "rope.scaling.factor"),  # llama.cpp scales linearly; the import would not
])
def test_hostile_files_are_refused_before_llama_cpp_runs(tok_dir, tmp_path, what, expect):  # noqa: F811
    import gguf as gg

    cls, kw = FAMILIES["qwen2"]
    src = _export(build(tok_dir, tmp_path / "q2", cls, **kw), tmp_path / "q2.gguf")
    kv, tensors = {}, {}
    if what == "nan":
        tensors["output_norm.weight"] = lambda a: np.full_like(a, np.nan)
        tensors["token_embd.weight"] = _nan_row
    elif what == "kv_heads":
        kv["qwen2.attention.head_count_kv"] = (3, gg.GGUFValueType.UINT32)
    elif what == "rot":
        kv["qwen2.rope.dimension_count"] = (8, gg.GGUFValueType.UINT32)
    else:
        kv["qwen2.rope.scaling.factor"] = (2.0, gg.GGUFValueType.FLOAT32)
    bad = _rewrite(src, tmp_path / f"{what}.gguf", kv, tensors)
    out = tmp_path / "back"
    out.mkdir()
    with pytest.raises(QuantizeError, match=expect):
        gguf_import.convert(bad, out)


def test_a_header_that_lies_about_its_sizes_is_refused_at_once(tmp_path):
    """A 100-byte file declaring an array of 2^61 numbers: gguf's own reader would loop, growing memory."""
    import struct

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + s("general.architecture") + struct.pack("<I", 8) + s("llama")
    path = tmp_path / "liar.gguf"
    path.write_bytes(head + s("x.arr") + struct.pack("<IIQ", 9, 4, 1 << 61) + b"\0" * 64)
    with pytest.raises(QuantizeError, match="an array of 2305843009213693952 items"):
        llama.check(path)


def test_tensors_sharing_bytes_are_refused(tok_dir, tmp_path):  # noqa: F811
    """Many tensors pointing at the same bytes would let a small file expand to gigabytes when dequantized."""
    import struct

    cls, kw = FAMILIES["qwen2"]
    src = _export(build(tok_dir, tmp_path / "q2", cls, **kw), tmp_path / "q2.gguf")
    data = bytearray(src.read_bytes())
    r = __import__("gguf").GGUFReader(str(src))
    first, second = r.tensors[0], r.tensors[1]
    # the second tensor's info: its name, n_dims, the dims, its type, then its offset
    name = struct.pack("<Q", len(second.name)) + second.name.encode()
    at = data.find(name) + len(name) + 4 + 8 * len(second.shape) + 4
    assert struct.unpack_from("<Q", data, at)[0] == int(second.data_offset) - int(r.data_offset)
    data[at:at + 8] = struct.pack("<Q", int(first.data_offset) - int(r.data_offset))
    bad = tmp_path / "alias.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(QuantizeError, match="out of order or overlapping"):
        gguf_import.read(bad)


def test_added_tokens_survive_the_sentencepiece_rewrite(vocab_dir, tmp_path):
    """An added token stays one token right after a word or a newline, as llama.cpp matches it."""
    from transformers import AutoTokenizer

    from appliance.train.bases import as_sentencepiece
    from tests.test_gguf_vocab import _gguf_tokenizes_as, _tiny_llama

    d = tmp_path / "spm"
    t0 = AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file="ggml-vocab-llama-spm.gguf")
    t0.add_tokens(["<tool>"])  # normalized, add_tokens' default
    t0.save_pretrained(d)
    tc = d / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "LlamaTokenizer"}))
    assert as_sentencepiece(d)
    tok = AutoTokenizer.from_pretrained(str(d))
    tool = tok.convert_tokens_to_ids("<tool>")
    assert tok.encode("call<tool>", add_special_tokens=False)[-1] == tool
    _tiny_llama(d, len(tok))
    _gguf_tokenizes_as(d, tok, ["call<tool>", "x\n<tool>", "call <tool> now", "<tool>"], tmp_path / "m.gguf")
