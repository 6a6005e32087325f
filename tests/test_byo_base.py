"""Bases a site brings (Llama 3, Qwen 2, Phi-3 shapes): import, SFT with the appliance's chat template when the
base has none, LoRA targets by architecture, and what import refuses (custom code, pickle weights)."""

import json

import pytest

from tests.conftest import artifact
from tests.test_train_run import FAST, run

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def _tokenizer(home):
    """The appliance's tokenizer fixture, as a base model's would ship: no chat template."""
    from appliance.train.model import load_tokenizer

    with artifact(home, home / "artifacts" / "tokenizers" / "handbook-bpe@1") as d:
        tok = load_tokenizer(d)
    tok.chat_template = None
    return tok


def _spm_tokenizer(tmp_path, kind: str):
    """A SentencePiece BPE as a base would ship it (`appliance.sample_bases`, 1,280 tokens learnt from sample
    sentences): Mistral v0.3's Metaspace tokenizer.json under `LlamaTokenizer`, or Gemma's `GemmaTokenizer` (no
    space prefix). llama.cpp's own SentencePiece vectors are checked in tests/test_gguf_vocab.py."""
    from appliance.sample_bases import _tokenizer

    words = "valve pump seal north river audit ledger inspection boiler report shift crew torque gasket".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i}." for i in range(300)]
    (tmp_path / "tok").mkdir()
    return _tokenizer("gemma2" if kind == "GemmaTokenizer" else "mistral", tmp_path / "tok", texts, 1024)


def _save_base(arch: str, tok, dest):
    """A tiny random model of `arch`, saved as a site would bring it (bf16; Qwen 2 sharded)."""
    import torch
    import transformers

    ids = dict(vocab_size=-(-len(tok) // 64) * 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    cls, kw = {
        "llama3": ("Llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})),
        "mistral": ("Mistral", dict(sliding_window=128, head_dim=32)),
        "qwen2": ("Qwen2", {}),
        "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True)),
        "phi3": ("Phi3", dict(num_key_value_heads=4)),
        "gemma2": ("Gemma2", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=32, tie_word_embeddings=True)),
    }[arch]
    cfg = getattr(transformers, f"{cls}Config")(**{**TINY, **kw}, **ids)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg)
    model.to(torch.bfloat16).save_pretrained(dest, max_shard_size="100KB" if arch == "qwen2" else "5GB")
    tok.save_pretrained(dest)
    if arch != "llama3":  # as older transformers wrote it; the llama3 one sits in a hub cache path instead
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "_name_or_path": f"site/{arch}-tiny"}))
    return dest


SEPARATE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.slow
@pytest.mark.parametrize("arch,targets,tokenizer", [
    ("llama3", SEPARATE, "appliance"),
    ("mistral", SEPARATE, "LlamaTokenizer"),
    ("qwen2", SEPARATE, "appliance"),
    ("qwen3", SEPARATE, "appliance"),
    ("phi3", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], "appliance"),
    ("gemma2", SEPARATE, "GemmaTokenizer"),
])
def test_import_sft_merge_and_export_each_family(train_home, cli, tmp_path, arch, targets, tokenizer):
    """The path most sites take: bring a base, LoRA SFT it on vault data, merge, ship a q8_0 GGUF with its report."""
    from transformers import AutoTokenizer

    where = tmp_path / "models--site--llama3-tiny" / "snapshots" / "0a1b2c" if arch == "llama3" else tmp_path / arch
    tok = _tokenizer(train_home) if tokenizer == "appliance" else _spm_tokenizer(tmp_path, tokenizer)
    src = _save_base(arch, tok, where)
    r = cli("--home", train_home, "--json", "train", "import", src, "--name", arch)
    assert r.code == 0, r.err
    base = r.json["base"]
    assert base["name"] == f"site/{arch}-tiny" and base["weight_dtypes"] == ["bfloat16"]
    assert base["revision"] == ("0a1b2c" if arch == "llama3" else None) and base["format"] == "transformers"
    assert base["architecture"] == r.json["architectures"][0] and base["sharded"] == (arch == "qwen2")
    assert set(base["files"]) == {p.name for p in src.iterdir()} and all(len(h) == 64 for h in base["files"].values())
    # Mistral's LlamaTokenizer runs as Metaspace under transformers 5: import writes it as SentencePiece runs it
    assert bool(r.json["tokenizer_rewritten"]) == (tokenizer == "LlamaTokenizer")
    tree = cli("--home", train_home, "--json", "lineage", f"{arch}@1").json["lineage"]
    assert tree["attrs"]["base"]["files"] == base["files"]

    r = cli("--home", train_home, "train", "run", "sft-lora", "--model.base", f"{arch}@1", "--train.max_steps", "2",
            "--train.batch_size", "4", "--data.seq_len", "64", *FAST)
    assert r.code == 0, r.err
    assert r.err.count("has no chat template: using the appliance's (ChatML") == 1
    merged = train_home / "artifacts" / "models" / "sft-lora-merged@1"
    with artifact(train_home, merged) as d:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert "<|im_start|>" in tok.chat_template  # saved with the model, so the GGUF carries it
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    node = cli("--home", train_home, "--json", "lineage", "sft-lora@1").json["lineage"]
    assert node["attrs"]["metrics"]["lora_target_modules"] == targets
    assert node["attrs"]["chat_template"].startswith("ChatML")

    r = cli("--home", train_home, "--json", "quantize", "sft-lora-merged@1", "--type", "q8_0",
            "--eval", "handbook-qa@1", "--eval-tokens", "256")
    assert r.code == 0, r.err
    q = r.json["quality"]
    assert q["tokenizer_agreed"] == q["tokenizer_records"] > 0, q
    assert q["tokenizer_hard_agreed"] == q["tokenizer_hard_strings"], q["tokenizer_hard_mismatches"]
    assert q["ppl_gguf"] > 0 and 0 < q["top1_agreement"] <= 1
    g = cli("--home", train_home, "--json", "generate", r.json["id"], "The valve", "--max-tokens", "4",
            "--temperature", "0")
    assert g.code == 0, g.err


def test_a_recipe_that_names_targets_keeps_them_and_templates_end_turns_with_eos(train_home, cli, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from appliance.train.bases import ensure_chat_template

    src = _save_base("llama3", _tokenizer(train_home), tmp_path / "llama3")
    assert cli("--home", train_home, "train", "import", src, "--name", "l3").code == 0
    d = run(cli, train_home, "sft-lora", "--model.base", "l3@1", "--train.max_steps", "2", "--train.batch_size", "4",
            "--data.seq_len", "64", "--lora.target_modules", "q_proj,v_proj", "--lora.merge", "false", *FAST)
    node = cli("--home", train_home, "--json", "lineage", d["id"]).json["lineage"]
    assert node["attrs"]["metrics"]["lora_target_modules"] == ["q_proj", "v_proj"]
    # a vocabulary without <|im_end|> (most bases): turns end with the tokenizer's EOS, which every runtime stops at
    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>")
    assert ensure_chat_template(tok) == "ChatML, turns ending with EOS"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}],
                                   tokenize=False)
    assert text == "<|im_start|>user\nhi</s>\n<|im_start|>assistant\nhi</s>\n"
    assert ensure_chat_template(tok) is None  # it has one now


@pytest.mark.parametrize("bad,expect", [
    ("auto_map", "needs custom code (auto_map in config.json)"),
    ("py", "ships code (modeling_evil.py)"),
    ("trust", "needs custom code (trust_remote_code in tokenizer_config.json)"),
    ("bin", "has pickle weights (pytorch_model.bin)"),
    ("arch", "architecture GPT2LMHeadModel is not supported"),
    ("shard", "lists shards that are missing"),
])
def test_import_refuses_custom_code_and_pickle_in_one_line(train_home, cli, tmp_path, bad, expect):
    src = _save_base("llama3", _tokenizer(train_home), tmp_path / "evil")
    config = json.loads((src / "config.json").read_text())
    if bad == "auto_map":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    elif bad == "arch":
        config["architectures"] = ["GPT2LMHeadModel"]
    elif bad == "py":
        (src / "modeling_evil.py").write_text("import os\n")
    elif bad == "bin":
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif bad == "trust":
        tc = json.loads((src / "tokenizer_config.json").read_text())
        (src / "tokenizer_config.json").write_text(json.dumps({**tc, "trust_remote_code": True}))
    elif bad == "shard":
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    (src / "config.json").write_text(json.dumps(config))
    r = cli("--home", train_home, "train", "import", src, "--name", "evil")
    assert r.code == 2 and expect in r.err, r.err
    assert len([ln for ln in r.err.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in r.err
    assert not (train_home / "artifacts" / "models" / "evil@1").exists()
    assert cli("--home", train_home, "--json", "lineage", "evil@1").code != 0
