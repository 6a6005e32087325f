"""Reinforcement tuning (`stage = "grpo"`): rewards, the reward rising on the sample task, failing rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import artifact, open_vault
from tests.test_train_run import FAST, losses, run

GRPO = ["grpo-lora", "--model.base", "gsft-merged@1", *FAST]


def greedy_reward(home: Path, model: str, limit: int = 40) -> float:
    """Mean overlap reward of the greedy answer to the first `limit` train prompts, generated here with
    plain transformers (apart from the training code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.train.config import DataConfig
    from appliance.train.data import chat_pairs
    from appliance.train.rewards import overlap

    with artifact(home, home / "artifacts" / "models" / model) as path:  # sealed: opened in memory
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    with open_vault(home, read_only=True) as v:
        pairs = list(chat_pairs(v.con, ["handbook-qa@1"], DataConfig(datasets=["handbook-qa@1"], format="chat")))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    scores = []
    for prompt, answer in pairs[:limit]:
        msgs = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[tok.eos_token_id, end],
                              pad_token_id=tok.eos_token_id)
        scores.append(overlap(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), answer, None))
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_grpo_trains_and_merges_on_the_sample_task(ghome, cli, capsys):
    d = run(cli, ghome, *GRPO, "--train.max_steps", "30", "--train.eval_every", "15")
    assert d["id"] == "grpo-lora@1" and d["stage"] == "grpo" and d["merged"] == "grpo-lora-merged@1"
    assert d["data"]["prompts"] > 70 and d["data"]["dropped"] == 0
    m = cli("--home", ghome, "--json", "train", "metrics", "grpo-lora@1").json["metrics"]
    rewards = [x["reward"] for x in m]
    assert len(rewards) == 30 and all(0 <= r <= 1 for r in rewards)
    vals = [x["val_loss"] for x in m if x["val_loss"] is not None]
    assert len(vals) == 2 and all(-1 <= v <= 0 for v in vals)  # minus the greedy reward on held-out prompts
    before, after = greedy_reward(ghome, "gsft-merged@1"), greedy_reward(ghome, "grpo-lora-merged@1")
    with capsys.disabled():
        print(f"\nGRPO LoRA, 30 steps, overlap reward: sampled {sum(rewards[:5]) / 5:.3f} (first 5 steps) -> "
              f"{sum(rewards[-5:]) / 5:.3f} (last 5); greedy on 40 train prompts {before:.3f} -> {after:.3f}")
    # Whether 30 CPU steps raise the reward depends on float rounding: benchmarks/agentic_task.py measures it.
    assert 0 <= before <= 1 and 0 <= after <= 1
    tree = cli("--home", ghome, "--json", "lineage", "grpo-lora@1").json["lineage"]
    assert tree["kind"] == "adapter" and tree["attrs"]["stage"] == "grpo"
    assert {(p["id"], p["role"]) for p in tree["parents"]} == {("gsft-merged@1", "base"), ("handbook-qa@1", "data")}
    summary = tree["attrs"]["metrics"]["rewards"]
    assert summary["reward_failures"] == {} and summary["first_reward"] == pytest.approx(rewards[0])


@pytest.mark.slow
def test_a_failing_reward_is_counted_and_training_goes_on(ghome, cli, tmp_path, monkeypatch):
    (tmp_path / "site_rewards.py").write_text(
        "from appliance.train.rewards import register\n"
        "@register('picky')\n"
        "def picky(completion, answer, cfg):\n"
        "    if len(completion) % 2:\n"
        "        raise RuntimeError('odd length: ' + str(len(completion)))\n"
        "    return 2.0 if len(completion) % 4 else 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("APPLIANCE_REWARD_PLUGINS", "site_rewards")
    d = run(cli, ghome, *GRPO, "--train.max_steps", "2", "--grpo.rewards", '["overlap", "picky"]',
            "--lora.merge", "false")
    assert d["status"] == "done" and d["steps"] == 2
    failures = cli("--home", ghome, "--json", "lineage", d["id"]).json["lineage"]["attrs"]["metrics"]["rewards"][
        "reward_failures"]
    assert set(failures) == {"picky"} and failures["picky"]["count"] > 0
    assert failures["picky"]["first"].startswith(("RuntimeError: odd length", "ValueError: returned 2.0"))
    assert all(math.isfinite(x) for x in losses(ghome, d["id"]))


def test_builtin_rewards():
    from appliance.train.config import GrpoConfig
    from appliance.train.rewards import REGISTRY, score

    cfg = GrpoConfig(pattern=r"\bcell\b", tools=["lookup"],
                     schema=json.dumps({"type": "object", "required": ["risk"],
                                        "properties": {"risk": {"enum": ["low", "high"]}}}))
    r = {k: (lambda c, a="", f=REGISTRY[k]: f(c, a, cfg)) for k in REGISTRY}
    assert r["exact"]("The tarn valve.", "the tarn valve") == 1.0 and r["exact"]("x", "") == 0.0
    assert r["overlap"]("the tarn valve isolates", "The tarn valve isolates the circuit") == pytest.approx(
        2 * 1.0 * (4 / 6) / (1.0 + 4 / 6))
    assert r["overlap"]("nothing alike", "the tarn valve") == 0.0
    assert r["regex"]("call the Signals cell") == 1.0 and r["regex"]("cellular") == 0.0
    assert r["json_schema"]('{"risk": "high"}') == 1.0 and r["json_schema"]('{"risk": "mild"}') == 0.0
    assert r["json_schema"]("```json\n{\"risk\": \"low\"}\n```") == 1.0 and r["json_schema"]("risk: high") == 0.0
    assert r["tool_call"]('{"name": "lookup", "arguments": {"id": 3}}') == 1.0
    assert r["tool_call"]('{"name": "rm", "arguments": {}}') == 0.0 and r["tool_call"]('{"name": "lookup"}') == 0.0
    failures: dict = {}
    REGISTRY["boom"] = lambda c, a, f: 1 / 0
    try:
        assert score(["regex", "boom"], "the cell", "", cfg, failures) == 0.5
    finally:
        del REGISTRY["boom"]
    assert failures == {"boom": {"count": 1, "first": "ZeroDivisionError: division by zero"}}


@pytest.mark.slow
def test_bad_grpo_recipes_say_what_to_do(ghome, cli):
    r = cli("--home", ghome, "train", "run", *GRPO, "--grpo.rewards", '["overlap", "vibes"]')
    assert r.code == 2 and "grpo.rewards: unknown vibes" in r.err
    r = cli("--home", ghome, "train", "run", *GRPO, "--grpo.rewards", '["regex"]')
    assert r.code == 2 and "grpo.pattern is required by the regex reward" in r.err
    r = cli("--home", ghome, "train", "run", *GRPO, "--grpo.group_size", "1", "--data.format", "chat")
    assert r.code == 2 and "grpo.group_size must be at least 2" in r.err and "goes with stage 'grpo'" in r.err
    r = cli("--home", ghome, "train", "run", *GRPO, "--data.datasets", "handbook@1")
    assert r.code == 2 and "has no table rows to train on" in r.err
    assert [x["id"] for x in cli("--home", ghome, "--json", "train", "runs").json["runs"]] == ["gb@1", "gsft@1"]


def test_answers_are_sampled_from_a_merged_copy_that_answers_as_the_policy_does():
    """The generator merges LoRA into a plain copy of the base; greedy answers from it, with a dynamic or a
    static cache, are the unmerged policy's, and a refresh follows the adapters as they train."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.train.grpo import Generator

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=2))
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the answers (they start at zero)
    ids = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 5, 6, 7]])  # left-padded prompts
    attn = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    kw = dict(attention_mask=attn, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    policy.eval()
    with torch.no_grad():
        want = policy.generate(input_ids=ids, **kw)
        with policy.disable_adapter():
            plain = policy.generate(input_ids=ids, **kw)
        assert not torch.equal(want, plain)  # the adapters matter to the answers
        gen = Generator("float32")
        merged = gen.refresh(policy)
        assert not hasattr(merged, "peft_config") and merged is not base
        assert torch.equal(merged.generate(input_ids=ids, **kw), want)
        assert torch.equal(merged.generate(input_ids=ids, cache_implementation="static", **kw), want)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.zero_()  # the adapters moved: a refresh follows them (here: back to the base)
        assert gen.refresh(policy) is merged
        assert torch.equal(merged.generate(input_ids=ids, **kw), plain)
