"""`appliance quantize` end to end on CPU, checked against llama.cpp (the reference reader) and transformers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from appliance import sealed
from tests.conftest import PY, artifact, artifact_bytes, copy_home, open_vault, python_env
from tests.servers import free_port, start_server

DENSE = ["name=kq", "model.hidden_size=256", "model.intermediate_size=512", "model.tie_embeddings=false",
         "train.max_steps=16", "train.checkpoint_every=1000", "train.warmup_steps=2"]
# 320 per expert: the experts' down projections have rows k-quants cannot take, so they must fall back.
MOE = ["name=kqmoe", "model.hidden_size=256", "model.intermediate_size=320", "train.max_steps=6",
       "train.checkpoint_every=1000", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def qbase(train_base, tmp_path_factory) -> Path:
    """train_base plus `kq@1` (dense, 256 wide, untied) and `kqmoe@1` (MoE), really trained a few steps."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run

    h = copy_home(train_base, tmp_path_factory.mktemp("quant"))
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", DENSE))
        run(v, load_recipe("tiny-moe", MOE))
    return h


@pytest.fixture
def qhome(qbase, tmp_path) -> Path:
    return copy_home(qbase, tmp_path)


@pytest.fixture(scope="module")
def q8home(qbase, tmp_path_factory) -> Path:
    """qbase plus the GGUF `kq@1:q8_0` (sealed, as every artifact); tests copy it before changing it."""
    from appliance.quantize.stage import quantize

    h = copy_home(qbase, tmp_path_factory.mktemp("q8"))
    with open_vault(h) as v:
        quantize(v, "kq@1", "q8_0", eval_tokens=256, threads=1)
    return h


def model_dir(h: Path, model: str) -> Path:
    return h / "artifacts" / "models" / model


def held_out(h: Path) -> list[str]:
    from appliance.vault.versions import iter_records

    with open_vault(h, read_only=True) as v:
        return [r["text"] for r in iter_records(v.con, "handbook@1")][:6]


def logits_both(h: Path, model: str, gguf: Path, text: str):
    """(transformers logits, llama.cpp logits) for the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.quantize import llama

    with artifact(h, model_dir(h, model)) as d:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        ids = tok(text, add_special_tokens=False)["input_ids"][:200]
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama.load(gguf, n_ctx=256, logits_all=True, threads=1)
    llm.eval(ids)
    b = np.asarray(llm.scores[:len(ids)])
    llm.close()
    return a, b


@pytest.mark.parametrize("model", ["kq@1", "kqmoe@1"])
def test_f32_export_gives_the_same_logits_as_transformers(qbase, tmp_path, model):
    from appliance.quantize import gguf_export

    out = tmp_path / "m.gguf"
    with artifact(qbase, model_dir(qbase, model)) as d:
        gguf_export.write(d, out, {"id": model, "name": model})
    a, b = logits_both(qbase, model, out, held_out(qbase)[0])
    assert np.abs(a - b).max() < 1e-2  # float32 sums in another order; a wrong export is off by whole units
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_a_wrong_rotary_permutation_is_caught_by_the_logits(qbase, tmp_path, monkeypatch):
    from appliance.quantize import gguf_arch, gguf_export

    monkeypatch.setattr(gguf_arch, "permute_qk", lambda w, n_head: w)  # what a naive converter does
    out = tmp_path / "m.gguf"
    with artifact(qbase, model_dir(qbase, "kq@1")) as d:
        gguf_export.write(d, out, {"id": "kq@1", "name": "kq@1"})
    a, b = logits_both(qbase, "kq@1", out, held_out(qbase)[0])
    assert np.abs(a - b).max() > 0.5 and (a.argmax(-1) == b.argmax(-1)).mean() < 0.95  # loads, runs, is wrong


def test_quantize_end_to_end(qhome, cli):
    r = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q4_k_m", "--strict")
    assert r.code == 0, r.err + r.out
    d = r.json
    assert d["id"] == "kq@1:q4_k_m" and d["type"] == "q4_k_m" and d["source"] == "kq@1" and not d["flagged"]
    path = Path(d["path"])  # the GGUF's plaintext name: sealed at rest, beside its sealed Modelfile and report
    assert not path.exists() and sealed.exists(path) and path.name == "kq@1-q4_k_m.gguf"
    assert sealed.sealed_names(path.parent) == sorted(["Modelfile", "appliance.json", path.name])
    assert d["size"] == len(artifact_bytes(qhome, path))
    # llama.cpp's mix: q4_k for most matrices, q6_k for some (attn_v, ffn_down, output), f32 norms
    assert set(d["tensor_types"]) == {"f32", "q4_k", "q6_k"} and d["fallbacks"] == []
    assert 4.5 < d["bits_per_weight"] < 6.5
    q = d["quality"]
    assert q["eval_data"] == "handbook@1" and q["eval_split"] == "validation" and q["tokens"] == 2048
    assert q["tokenizer_records"] >= 1 and q["tokenizer_agreed"] == q["tokenizer_records"]
    assert q["tokenizer_hard_strings"] >= 10 and q["tokenizer_hard_agreed"] == q["tokenizer_hard_strings"]
    assert abs(q["ppl_delta_pct"]) < 3 and q["top1_agreement"] > 0.9 and q["ok"]
    # the file stands on its own: metadata and tokenizer that llama.cpp reads back
    from appliance.quantize import llama

    with artifact(qhome, path) as p:
        llm = llama.load(p, n_ctx=128, threads=1)
    assert llm.metadata["general.architecture"] == "llama" and llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert llm.metadata["appliance.source"] == "kq@1" and "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    llm.close()
    side_text = artifact_bytes(qhome, path.parent / "appliance.json").decode()
    side = json.loads(side_text)
    assert side["source_hash"] and side["sha256"] and side["result"]["quality"]["ok"]
    modelfile = artifact_bytes(qhome, path.parent / "Modelfile").decode()
    assert f"FROM ./{path.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # no vault text outside the vault: the report holds numbers and positions only
    for text in held_out(qhome):
        for f in (side_text, modelfile):
            assert text[:60] not in f
    # lineage and audit
    tree = cli("--home", qhome, "--json", "lineage", "kq@1:q4_k_m").json["lineage"]
    assert tree["kind"] == "gguf" and tree["content_hash"] == side["sha256"]
    assert {(p["id"], p["role"]) for p in tree["parents"]} == {("kq@1", "source"), ("handbook@1", "eval")}
    assert tree["attrs"]["bits_per_weight"] == d["bits_per_weight"] and tree["attrs"]["quality"]["ok"]
    log = cli("--home", qhome, "--json", "audit", "log", "--action", "quantize.*").json["entries"]
    assert [e["action"] for e in log] == ["quantize.export"]
    listed = cli("--home", qhome, "--json", "quantize", "--list").json["gguf"]
    assert [x["id"] for x in listed] == ["kq@1:q4_k_m"]
    # the same export again is the recorded one, not a new id
    again = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q4_k_m").json
    assert again["existing"] and again["path"] == d["path"] and again["quality"] == d["quality"]


def test_the_vault_is_free_while_a_model_is_quantized_and_exports_take_turns(qhome):
    from appliance.quantize.stage import quantize

    seen = {}

    def appliance(*args):
        return subprocess.run([PY, "-m", "appliance", "--home", str(qhome), *args], env=python_env(),
                              capture_output=True, text=True, timeout=120)

    def progress(stage, done, total):
        if stage == "quantize" and not seen:  # llama.cpp is at work: another process may use the vault
            seen["datasets"] = appliance("--json", "vault", "datasets")
            seen["second"] = appliance("quantize", "kq@1", "--type", "q4_0")

    with open_vault(qhome) as v:
        res = quantize(v, "kq@1", "q8_0", eval_tokens=256, threads=1, progress=progress)
        assert v.con is not None and v.con.execute("SELECT 1 FROM lineage_nodes WHERE id = ?", [res.id]).fetchone()
    assert seen["datasets"].returncode == 0, seen["datasets"].stderr
    assert "handbook" in [d["name"] for d in json.loads(seen["datasets"].stdout)["datasets"]]
    second = seen["second"]
    assert second.returncode == 1 and "another quantize is running in this home" in second.stderr
    assert second.stderr.count("\n") == 1
    assert not (qhome / "artifacts" / "gguf" / "kq@1-q4_0").exists()


def test_every_type_and_the_mixture_of_experts(qhome):
    from appliance.quantize.stage import quantize

    sizes = {}
    with open_vault(qhome) as v:
        for t in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"):
            res = quantize(v, "kq@1", t, eval_tokens=512, threads=1)
            sizes[t] = res.size
            assert res.quality["ok"], (t, res.quality["flags"])
            if t in ("f32", "f16"):  # unquantized files must agree with transformers token for token
                assert res.quality["top1_agreement"] == 1.0 and res.quality["max_logit_diff"] < 0.05
        assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q6_k"] > sizes["q5_k_m"] > sizes["q4_k_m"]
        assert sizes["q4_0"] < sizes["q5_k_m"]
        moe = quantize(v, "kqmoe@1", "q4_k_m", eval_tokens=512, threads=1)
    assert moe.quality["ok"] and moe.quality["tokenizer_agreed"] == moe.quality["tokenizer_records"]
    # rows of 320 cannot fill 256-value k-quant blocks: the report names each tensor and why
    fell = {f["tensor"]: f for f in moe.fallbacks}
    assert set(fell) == {"blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"}
    assert all(f["stored_as"] in ("q5_0", "q8_0") and "not a multiple of 256" in f["why"] for f in fell.values())


def test_importance_matrix_from_vault_data(qhome, cli):
    r = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q4_k_m", "--imatrix", "handbook@1",
            "--eval-tokens", "512")
    assert r.code == 0, r.err
    d = r.json
    assert d["id"] == "kq@1:q4_k_m-imatrix" and d["imatrix"] == "handbook@1" and d["quality"]["ok"]
    # llama.cpp received one entry per quantized matrix: 7 per layer and the untied output
    assert d["imatrix_entries"] == 15
    plain = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q4_k_m", "--eval-tokens", "512").json
    q = "blk.0.attn_q.weight"
    assert tensor_bytes(qhome, plain["path"], q) != tensor_bytes(qhome, d["path"], q)
    norm = "blk.0.attn_norm.weight"
    assert tensor_bytes(qhome, plain["path"], norm) == tensor_bytes(qhome, d["path"], norm)
    other = cli("--home", qhome, "quantize", "kq@1", "--type", "q4_k_m", "--imatrix", "handbook-qa@1")
    assert other.code == 2 and "already exists, quantized with the importance matrix of handbook@1" in other.err
    tree = cli("--home", qhome, "--json", "lineage", "kq@1:q4_k_m-imatrix").json["lineage"]
    assert ("handbook@1", "imatrix") in {(p["id"], p["role"]) for p in tree["parents"]}
    bad = cli("--home", qhome, "quantize", "kq@1", "--type", "f16", "--imatrix", "handbook@1")
    assert bad.code == 2 and "--imatrix does nothing for f16" in bad.err


def tensor_bytes(h: Path, path: str, name: str) -> bytes:
    """One tensor's bytes in the sealed GGUF `path` of home `h`."""
    from gguf import GGUFReader

    with artifact(h, path) as p:
        return next(t for t in GGUFReader(str(p)).tensors if t.name == name).data.tobytes()


def test_importance_matrix_of_experts(qhome):
    """One row per expert, averaged over the tokens the router sends it; llama.cpp takes every entry."""
    from appliance.quantize.imatrix import compute, load_source
    from appliance.quantize.stage import quantize

    with artifact(qhome, model_dir(qhome, "kqmoe@1")) as d:
        model = load_source(d)
    got = compute(model, [np.arange(3, 131, dtype=np.int64)])
    assert got["blk.0.ffn_gate_exps.weight"].shape == (4 * 256,)
    assert got["blk.0.ffn_down_exps.weight"].shape == (4 * 320,)  # the down projection's input is 320 wide
    rows = got["blk.1.ffn_up_exps.weight"].reshape(4, 256)
    assert len({round(float(r.mean()), 6) for r in rows}) > 1  # experts saw different tokens
    with open_vault(qhome) as v:
        res = quantize(v, "kqmoe@1", "q4_k_m", imatrix_ref="handbook@1", eval_tokens=256, imatrix_tokens=512,
                       threads=1)
    assert res.imatrix_entries == 14 and res.quality["ok"]  # 2 layers x (4 attention + 3 expert tensors)


def test_importance_matrix_values_are_mean_squared_activations(qbase):
    """Checked against a direct computation for one layer: mean over tokens of x_j^2 at q_proj's input."""
    import torch

    from appliance.quantize.imatrix import compute, load_source

    with artifact(qbase, model_dir(qbase, "kq@1")) as d:
        model = load_source(d)
    ids = np.arange(3, 67, dtype=np.int64)
    got = compute(model, [ids])
    seen = {}
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0][0]))
    with torch.no_grad():
        model(torch.as_tensor(ids)[None])
    h.remove()
    want = (seen["x"].double() ** 2).mean(0).numpy()
    assert np.allclose(got["blk.1.attn_q.weight"], want, rtol=1e-5)
    assert "output.weight" in got and "token_embd.weight" not in got


def test_a_quant_over_its_bound_is_flagged_and_strict_fails(qhome, cli):
    r = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q4_0", "--ppl-bound", "0.01", "--strict",
            "--eval-tokens", "512")
    assert r.code == 1
    d = r.json
    assert d["ok"] is False and d["flagged"] and "perplexity rose" in d["quality"]["flags"][0]
    assert sealed.exists(Path(d["path"]))  # kept, and recorded as flagged, for the operator to inspect
    listed = cli("--home", qhome, "--json", "quantize", "--list").json["gguf"]
    assert listed[0]["flagged"]
    human = cli("--home", qhome, "quantize", "kq@1", "--type", "q4_0", "--ppl-bound", "0.01")
    assert human.code == 0 and "warning: perplexity rose" in human.err  # without --strict: a warning
    # the recorded export is judged again against the bound asked for now
    again = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q4_0", "--strict")
    assert again.code == 0 and again.json["existing"] and not again.json["flagged"]


def test_bad_input_is_one_line_and_leaves_nothing(qhome, cli, tmp_path, monkeypatch):
    gguf_root = qhome / "artifacts" / "gguf"

    def nothing_left():
        assert not gguf_root.exists() or not any(gguf_root.iterdir())
        assert cli("--home", qhome, "--json", "quantize", "--list").json["gguf"] == []

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    r = cli("generate", not_gguf, "hi")
    assert r.code == 1 and "is not a GGUF file" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("quantize", "kq@1", "--type", "q3_k", "--home", qhome)
    assert r.code == 2 and "unknown quantization type" in r.err
    r = cli("--home", qhome, "quantize", "nope@1")
    assert r.code == 2 and "no model nope@1" in r.err
    # a failure in the middle (llama.cpp refusing) leaves no file, no temp dir, no lineage node
    from appliance.quantize import llama
    from appliance.quantize.types import QuantizeError

    def refuse(*a, **k):
        raise QuantizeError("llama.cpp could not quantize to q4_k_m: disk full", "free space")

    with monkeypatch.context() as m:
        m.setattr(llama, "quantize", refuse)
        r = cli("--home", qhome, "quantize", "kq@1")
    assert r.code == 1 and "disk full" in r.err
    nothing_left()
    # a model without a tokenizer, and an architecture llama.cpp's llama arch cannot hold
    d = model_dir(qhome, "kq@1")
    files = {n: artifact_bytes(qhome, d / n) for n in sealed.sealed_names(d)}
    with open_vault(qhome):  # the model as the appliance would write it without a tokenizer (a deleted file is
        sealed.write_dir(d, {n: b for n, b in files.items() if n != "tokenizer.json"})  # refused by its manifest)
    r = cli("--home", qhome, "quantize", "kq@1")
    assert r.code == 1 and "kq@1 has no tokenizer.json" in r.err and ".mem-" not in r.err
    with open_vault(qhome):
        sealed.write_dir(d, files)
    cfg = json.loads(artifact_bytes(qhome, d / "config.json"))
    with open_vault(qhome):  # sealed again under the model's key, as the appliance writes it
        sealed.write_file(d / "config.json",
                          json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}).encode())
    r = cli("--home", qhome, "quantize", "kq@1")
    assert r.code == 1 and "unsupported architecture 'gpt2'" in r.err
    nothing_left()


def test_a_malformed_model_is_named_by_its_id_not_its_in_memory_copy(qhome, cli):
    d = model_dir(qhome, "kq@1")
    files = {n: artifact_bytes(qhome, d / n) for n in sealed.sealed_names(d)}
    with open_vault(qhome):
        sealed.write_file(d / "config.json", b'{"model_type": "llama", ')  # cut short
    errs = [cli("--home", qhome, "quantize", "kq@1")]
    assert errs[-1].code == 1 and errs[-1].err.startswith("error: kq@1/config.json is not valid JSON"), errs[-1].err
    with open_vault(qhome):
        sealed.write_dir(d, {n: b for n, b in files.items() if n != "config.json"})
        sealed.write_dir(model_dir(qhome, "kqmoe@1"), {n: b for n, b in files.items() if n != "model.safetensors"})
    errs.append(cli("--home", qhome, "quantize", "kq@1"))
    assert errs[-1].err.startswith("error: kq@1 is not a model directory (no config.json)"), errs[-1].err
    errs.append(cli("--home", qhome, "quantize", "kqmoe@1"))
    assert errs[-1].err.startswith("error: kqmoe@1 has no model.safetensors"), errs[-1].err
    for r in errs:
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1
        assert ".mem-" not in r.err and "/proc/" not in r.err and str(qhome) not in r.err


def test_truncated_gguf_is_refused(qhome, cli, tmp_path):
    r = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q8_0", "--eval-tokens", "256")
    data = artifact_bytes(qhome, r.json["path"])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 2])
    r = cli("generate", cut, "hi")
    assert r.code == 1 and "truncated" in r.err and len(r.err.strip().splitlines()) == 1


def test_generate_matches_transformers_greedy_and_needs_no_torch(qhome, cli, tmp_path):
    r = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "f32", "--eval-tokens", "256")
    assert cli("--home", qhome, "model", "export", "kq@1:f32", "--out", tmp_path / "plain").code == 0
    # an f32 export is the GGUF, its Modelfile and report: no empty second .gguf beside it
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["Modelfile", "appliance.json", "kq@1-f32.gguf"]
    path = str(tmp_path / "plain" / Path(r.json["path"]).name)  # the GGUF as it leaves the home, in the clear
    prompt = "The HALO permit"
    # the command, on an edge device: no vault, no passphrase, no torch, no duckdb
    code = ("import sys; from appliance.cli import main\n"
            "try: main(['--json', 'generate', sys.argv[1], sys.argv[2], '--max-tokens', '12', '--temperature', '0'])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'duckdb' not in sys.modules, 'heavy import'\n")
    env = python_env()
    env.pop("APPLIANCE_PASSPHRASE")
    p = subprocess.run([PY, "-c", code, path, prompt], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    text = json.loads(p.stdout)["text"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with artifact(qhome, model_dir(qhome, "kq@1")) as d:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    want = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text and want.startswith(text)  # llama.cpp's greedy tokens are transformers' (it may stop at EOS)
    by_id = cli("--home", qhome, "--json", "generate", "kq@1:f32", prompt, "--max-tokens", "12", "--temperature", "0")
    assert by_id.code == 0 and by_id.json["text"].strip() == text.strip()


def test_a_gguf_leaves_in_the_clear_by_export_and_runs_from_an_encrypted_bundle(q8home, cli, tmp_path,
                                                                                 monkeypatch):
    """`model export` writes the plain .gguf (audited); an edge device runs the GGUF of an encrypted bundle from
    memory, and greedy decoding gives what the home's sealed GGUF gives."""
    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key pass 1234")
    h = copy_home(q8home, tmp_path)
    gid, prompt = "kq@1:q8_0", "The HALO permit"
    sealed_path = h / "artifacts" / "gguf" / "kq@1-q8_0" / "kq@1-q8_0.gguf"
    plain = artifact_bytes(h, sealed_path)
    out = tmp_path / "plain"
    r = cli("--home", h, "--json", "model", "export", gid, "--out", out)
    assert r.code == 0, r.err
    assert r.json["id"] == gid and r.json["kind"] == "gguf" and "kq@1-q8_0.gguf" in r.json["files"]
    assert (out / "kq@1-q8_0.gguf").read_bytes() == plain
    from appliance.quantize import llama

    llm = llama.load(out / "kq@1-q8_0.gguf", n_ctx=128, threads=1)  # llama.cpp reads the plain file as it is
    assert llm.metadata["appliance.source"] == "kq@1"
    llm.close()
    log = cli("--home", h, "--json", "audit", "log", "--action", "model.export").json["entries"]
    assert [(e["action"], e["ids"], e["details"]["out"]) for e in log] == [("model.export", [gid], str(out))]
    # an encrypted bundle to an edge key, run there from memory: no vault, no passphrase, nothing unpacked
    assert cli("--home", h, "keys", "generate", "--name", "site-a").code == 0
    assert cli("--home", h, "keys", "generate", "--name", "edge").code == 0
    bundle = tmp_path / "kq.bundle"
    r = cli("--home", h, "--json", "bundle", "export", gid, "--sign-key", "site-a", "--to", h / "keys" / "edge.pub",
            "--out", bundle)
    assert r.code == 0 and r.json["encrypted_to"], r.err
    assert plain[:4096] not in bundle.read_bytes()
    edge = tmp_path / "edge"
    edge.mkdir()
    env = {**python_env(), "APPLIANCE_KEY_PASSPHRASE": "key pass 1234", "APPLIANCE_HOME": str(edge / "none")}
    env.pop("APPLIANCE_PASSPHRASE")
    p = subprocess.run([PY, "-m", "appliance", "--json", "generate", str(bundle), prompt, "--identity",
                        str(h / "keys" / "edge.key"), "--trust", str(h / "keys" / "site-a.pub"), "--max-tokens", "12",
                        "--temperature", "0"], cwd=edge, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert list(edge.iterdir()) == []
    by_id = cli("--home", h, "--json", "generate", gid, prompt, "--max-tokens", "12", "--temperature", "0")
    assert by_id.code == 0 and json.loads(p.stdout)["text"] == by_id.json["text"] and by_id.json["text"].strip()


def test_chat_streams_replies_until_exit(qhome, cli):
    path = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q8_0", "--eval-tokens", "256").json["path"]
    p = subprocess.run([PY, "-m", "appliance", "chat", path, "--max-tokens", "8", "--seed", "3"],
                       input="What is a permit?\n/reset\nAnd HALO?\n/exit\n", capture_output=True, text=True,
                       env=python_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("model> ") == 2 and "(conversation cleared)" in p.stdout
    p = subprocess.run([PY, "-m", "appliance", "--json", "chat", path, "--max-tokens", "8", "--seed", "3"],
                       input="What is a permit?\n", capture_output=True, text=True, env=python_env(), timeout=120)
    d = json.loads(p.stdout)  # with --json, stdout is one object and nothing else
    assert p.returncode == 0 and d["turns"] == 1 and len(d["replies"]) == 1


def test_serve_speaks_openai_to_the_official_client(qhome, cli, tmp_path):
    from openai import AuthenticationError, OpenAI

    path = cli("--home", qhome, "--json", "quantize", "kq@1", "--type", "q8_0", "--eval-tokens", "256").json["path"]
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    env = {**python_env(), "APPLIANCE_API_KEY_FILE": str(key_file)}
    proc = start_server(["serve", path], port, env)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["kq@1-q8_0"]
        chat = client.chat.completions.create(model="kq@1-q8_0", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        comp = client.completions.create(model="kq@1-q8_0", prompt="The permit", max_tokens=6, temperature=0)
        assert comp.choices[0].text is not None and comp.usage.prompt_tokens > 0
        pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="kq@1-q8_0", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
            stream=True) if c.choices and c.choices[0].delta.content]
        assert pieces and "".join(pieces) == chat.choices[0].message.content
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
        busy = subprocess.run([PY, "-m", "appliance", "serve", path, "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1 and "could not listen on 127.0.0.1" in busy.stderr
    finally:
        proc.send_signal(2)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()  # Ctrl-C is how a server is stopped
    r = cli("serve", path, "--host", "0.0.0.0")  # no key in this environment
    assert r.code == 2 and "without an API key" in r.err
