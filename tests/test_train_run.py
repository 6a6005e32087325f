"""`appliance train run` end to end on CPU: every stage, what lands on disk, lineage, metrics, failures."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import artifact, artifact_bytes, open_vault

FAST = ["--train.warmup_steps", "1", "--train.checkpoint_every", "100"]


def run(cli, home, *args):
    r = cli("--home", home, "--json", "train", "run", *args)
    assert r.code == 0, r.err + r.out
    return r.json


def losses(home, run_id):
    with open_vault(home, read_only=True) as v:
        return [r[0] for r in v.con.execute("SELECT loss FROM train_metrics WHERE run = ? ORDER BY step",
                                            [run_id]).fetchall()]


def load(home, path):
    """A model the appliance saved (sealed), loaded with stock transformers from its plaintext in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with artifact(home, path) as p:
        return (AutoModelForCausalLM.from_pretrained(p, local_files_only=True),
                AutoTokenizer.from_pretrained(p, local_files_only=True))


def weights(home, path):
    from safetensors.torch import load

    return load(artifact_bytes(home, f"{path}/model.safetensors"))


def names(home, path) -> set[str]:
    from appliance import sealed

    return set(sealed.sealed_names(Path(path)))


def test_pretrain_dense_lands_a_plain_transformers_model_with_lineage(train_home, cli):
    stale = train_home / "artifacts" / "models" / "tiny-dense@1"
    stale.mkdir(parents=True)  # what a crash between saving and recording leaves
    (stale / "junk").write_text("x")
    d = run(cli, train_home, "tiny-dense", "--train.max_steps", "8", *FAST)
    assert d["id"] == "tiny-dense@1" and d["status"] == "done" and d["steps"] == 8
    assert d["data"]["padding_fraction"] < 0.01 and d["data"]["rows"] > 100
    model, tok = load(train_home, d["model_path"])
    assert type(model).__name__ == "LlamaForCausalLM"
    import torch

    with torch.no_grad():
        out = model.generate(**tok("The HALO permit", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 3
    info = json.loads(artifact_bytes(train_home, f"{d['model_path']}/appliance.json"))
    assert info["recipe"]["train"]["max_steps"] == 8 and info["code_version"].startswith("0.")
    assert info["datasets"][0]["version"] == "handbook@1" and len(info["datasets"][0]["content_hash"]) == 64
    ls = losses(train_home, "tiny-dense@1")
    assert len(ls) == 8 and ls[-1] < ls[0] - 0.3  # it learns
    tree = cli("--home", train_home, "--json", "lineage", "tiny-dense@1").json["lineage"]
    assert tree["kind"] == "model" and tree["content_hash"]
    assert {(p["id"], p["role"]) for p in tree["parents"]} == {("handbook@1", "data"), ("handbook-bpe@1", "tokenizer")}
    assert tree["attrs"]["metrics"]["steps"] == 8
    runs = cli("--home", train_home, "--json", "train", "runs").json["runs"]
    assert runs[-1]["status"] == "done" and runs[-1]["step"] == 8
    m = cli("--home", train_home, "--json", "train", "metrics", "tiny-dense@1").json["metrics"]
    assert [x["step"] for x in m] == list(range(1, 9)) and all(x["tokens_per_s"] > 0 for x in m)
    log = cli("--home", train_home, "--json", "audit", "log", "--action", "train.*").json["entries"]
    assert {e["action"] for e in log} == {"train.start", "train.run", "train.tokenizer"}
    # a second run of the same recipe is the next number, and reuses the packed rows from the vault
    d2 = run(cli, train_home, "tiny-dense", "--train.max_steps", "2", *FAST)
    assert d2["id"] == "tiny-dense@2"
    # ids are never reused across kinds: a model named like a tokenizer takes the next number
    d3 = run(cli, train_home, "tiny-dense", "--train.max_steps", "2", "--name", "handbook-bpe", *FAST)
    assert d3["id"] == "handbook-bpe@2"


def test_pretrain_mixture_of_experts(train_home, cli):
    d = run(cli, train_home, "tiny-moe", "--train.max_steps", "3", *FAST)
    model, _ = load(train_home, d["model_path"])
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    assert all(x == x for x in losses(train_home, d["id"]))


def test_sft_full_lora_qlora_and_merge(train_home, cli):
    import torch

    base = run(cli, train_home, "tiny-dense", "--train.max_steps", "2", *FAST)["model_path"]
    base_weights = weights(train_home, base)
    full = run(cli, train_home, "sft-full", "--model.base", "tiny-dense@1", "--train.max_steps", "2", *FAST)
    assert type(load(train_home, full["model_path"])[0]).__name__ == "LlamaForCausalLM"
    lora = run(cli, train_home, "sft-lora", "--model.base", "tiny-dense", "--train.max_steps", "3", *FAST)
    files = names(train_home, lora["model_path"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # an adapter, not a copy of the base
    assert lora["merged"] == "sft-lora-merged@1"
    merged, tok = load(train_home, f"{train_home}/artifacts/models/sft-lora-merged@1")
    changed = [k for k, w in merged.state_dict().items() if k in base_weights
               and not torch.equal(w, base_weights[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted layers moved
    assert weights(train_home, base).keys() == base_weights.keys()
    assert tok.convert_tokens_to_ids("<|im_end|>") in merged.generation_config.eos_token_id
    tree = cli("--home", train_home, "--json", "lineage", "sft-lora-merged@1").json["lineage"]
    assert {(p["id"], p["role"]) for p in tree["parents"]} == {("sft-lora@1", "adapter"), ("tiny-dense@1", "base")}
    q = run(cli, train_home, "sft-qlora", "--model.base", "tiny-dense@1", "--train.max_steps", "2",
            "--lora.merge", "false", *FAST)
    assert q["merged"] is None and q["method"] == "qlora"
    assert json.loads(artifact_bytes(train_home, f"{q['model_path']}/adapter_config.json"))["r"] == 8
    r = cli("--home", train_home, "--json", "train", "merge", "sft-qlora@1")
    assert r.code == 0, r.err
    assert type(load(train_home, r.json["path"])[0]).__name__ == "LlamaForCausalLM"
    r = cli("--home", train_home, "train", "merge", "sft-qlora@1")
    assert r.code == 2 and "already merged as sft-qlora-merged@1" in r.err
    kinds = {m["id"]: m["kind"] for m in cli("--home", train_home, "--json", "train", "models").json["models"]}
    assert kinds["sft-qlora@1"] == "adapter" and kinds["sft-qlora-merged@1"] == "model"


LORA_THEN_QLORA = """
import sys, tempfile
from transformers import LlamaConfig, LlamaForCausalLM
from appliance.train.config import LoraConfig
from appliance.train.model import load_base
d = tempfile.mkdtemp()
LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
lora = load_base(d, "lora", LoraConfig(rank=2))
print("after lora:", "bitsandbytes" in sys.modules)
qlora = load_base(d, "qlora", LoraConfig(rank=2))
print("after qlora:", type(qlora.base_model.model.model.layers[0].self_attn.q_proj).__module__)
"""


def test_a_lora_process_never_imports_bitsandbytes_and_qlora_still_works_after_it():
    """bitsandbytes costs every process that imports peft about 1.5 s; only QLoRA needs it."""
    from tests.conftest import PY, python_env

    p = subprocess.run([PY, "-c", LORA_THEN_QLORA], capture_output=True, text=True, env=python_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "after lora: False" in p.stdout and "after qlora: peft.tuners.lora.bnb" in p.stdout, p.stdout


def test_continue_from_an_imported_local_model(train_home, cli, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.train.model import load_tokenizer

    src = tmp_path / "site-base"
    with artifact(train_home, train_home / "artifacts" / "tokenizers" / "handbook-bpe@1") as d:
        tok = load_tokenizer(d)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(src)
    tok.pad_token = None  # many imported tokenizers have none: padding falls back to EOS (never scored)
    tok.save_pretrained(src)
    r = cli("--home", train_home, "--json", "train", "import", src, "--name", "site-base")
    assert r.code == 0, r.err
    assert r.json["id"] == "site-base@1" and r.json["architectures"] == ["LlamaForCausalLM"]
    d = run(cli, train_home, "continue", "--model.base", "site-base", "--data.datasets", "mail",
            "--data.seq_len", "64", "--train.max_steps", "2", "--train.batch_size", "4", *FAST)
    tree = cli("--home", train_home, "--json", "lineage", d["id"]).json["lineage"]
    assert {(p["id"], p["role"]) for p in tree["parents"]} == {("mail@1", "data"), ("site-base@1", "base")}
    r = cli("--home", train_home, "train", "run", "continue", "--model.base", "site-base", "--data.seq_len", "4096")
    assert r.code == 2 and "exceeds the base model's context of 128" in r.err
    # what import refuses
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "auto_map": {"AutoModel": "x.Y"}}))
    r = cli("--home", train_home, "train", "import", src, "--name", "evil")
    assert r.code == 2 and "custom code" in r.err
    r = cli("--home", train_home, "train", "import", tmp_path / "nothing", "--name", "x")
    assert r.code == 2 and "not a directory" in r.err


def test_bad_runs_say_what_to_do(train_home, cli):
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--data.tokenizer", "nope")
    assert r.code == 2 and "no tokenizer nope" in r.err and "appliance train tokenizer" in r.err
    r = cli("--home", train_home, "train", "run", "sft-lora", "--model.base", "ghost@3")
    assert r.code == 2 and "no base model ghost@3" in r.err
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--resume")
    assert r.code == 2 and "no unfinished run of tiny-dense" in r.err
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--gpus", "3")
    assert r.code == 2 and "does not split into 3 process(es)" in r.err
    r = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--train.max_steps", "4",
            "--train.lr", "1e30", "--train.min_lr", "0", "--train.warmup_steps", "0", "--train.grad_clip", "0",
            "--train.checkpoint_every", "1")
    assert r.code == 1 and "loss became" in r.json["error"] and "last good checkpoint" in r.json["error"]
    runs = cli("--home", train_home, "--json", "train", "runs").json["runs"]
    assert runs[-1]["status"] == "failed" and "loss became" in runs[-1]["error"]
    # the checkpoint it names holds finite weights that load
    import torch

    ckpt = r.json["error"].split("last good checkpoint is ")[1].split(";")[0].strip()
    from appliance.train.checkpoint import read_weights

    assert list(Path(ckpt).glob("*.distcp.sealed"))  # sharded torch.distributed.checkpoint files, sealed
    assert not [p for p in Path(ckpt).iterdir() if not p.name.endswith(".sealed")]
    with open_vault(train_home, read_only=True):  # the run's key is in the vault
        weights = read_weights(Path(ckpt))
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--resume", "--model.num_layers", "3")
    assert r.code == 2 and "different settings: model.num_layers" in r.err
    # an unpinned base that now resolves to a newer model is refused, not silently swapped
    diverge = ["--train.lr", "1e30", "--train.min_lr", "0", "--train.warmup_steps", "0", "--train.grad_clip", "0"]
    pilot = ["tiny-dense", "--train.max_steps", "1", "--train.warmup_steps", "0", "--name", "pilot"]
    run(cli, train_home, *pilot)
    assert cli("--home", train_home, "train", "run", "sft-full", "--model.base", "pilot", *diverge).code == 1
    run(cli, train_home, *pilot)
    r = cli("--home", train_home, "train", "run", "sft-full", "--model.base", "pilot", *diverge, "--resume")
    assert r.code == 2 and "trained on handbook-qa@1, pilot@1; the recipe now resolves to handbook-qa@1, pilot@2" \
        in r.err


def _spawn(home, *args):
    from tests.conftest import PY, python_env

    return subprocess.Popen([PY, "-m", "appliance", "--home", str(home), "train", "run", *args],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    import time

    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.02)


# Enough steps that a stop at the first checkpoint lands mid-way, with checkpoints to resume from on each side.
LONG = ["--train.max_steps", "16", "--train.checkpoint_every", "4", "--train.warmup_steps", "2"]
FIRST_CKPT = "step-00000004"


@pytest.fixture(scope="module")
def whole_losses(train_base, tmp_path_factory) -> list[float]:
    """The losses of one uninterrupted LONG run: what every stopped-and-resumed run must repeat.

    In this process through the API (the resumed runs it is compared with are in-process CLI runs too): a
    subprocess would spend most of its time importing torch and transformers."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run as train
    from tests.conftest import PASSPHRASE, copy_home

    h = copy_home(train_base, tmp_path_factory.mktemp("whole"))
    overrides = [f"{k[2:]}={v}" for k, v in zip(LONG[::2], LONG[1::2])]
    with pytest.MonkeyPatch.context() as mp:  # as the function-scoped autouse fixture sets it for every test
        mp.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
        mp.setenv("APPLIANCE_TRAIN_THREADS", "1")
        with open_vault(h) as v:
            run_id = train(v, load_recipe("tiny-dense", [*overrides, "name=whole"])).id
    return losses(h, run_id)


def test_resume_after_a_kill_repeats_the_uninterrupted_run(train_home, cli, whole_losses):
    import signal

    proc = _spawn(train_home, "tiny-dense", *LONG, "--name", "killed")
    ckpts = train_home / "artifacts" / "runs" / "killed@1" / "checkpoints"
    _wait_for(ckpts / FIRST_CKPT, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    runs = cli("--home", train_home, "--json", "train", "runs", "--name", "killed").json["runs"]
    assert runs[0]["status"] == "running" and runs[0]["step"] < 16  # killed mid-way
    d = run(cli, train_home, "tiny-dense", *LONG, "--name", "killed", "--resume")
    assert d["id"] == "killed@1" and d["resumed_from"] >= 4 and d["steps"] == 16
    assert losses(train_home, "killed@1") == whole_losses  # exactly, on CPU
    assert len(losses(train_home, "killed@1")) == 16


def test_background_checkpoints_are_sealed_and_a_kill_resumes_from_them_exactly(train_home, cli, whole_losses):
    import signal

    from appliance import sealed

    bg = ["--train.checkpoint_async", "on"]
    proc = _spawn(train_home, "tiny-dense", *LONG, *bg, "--name", "behind")
    ckpts = train_home / "artifacts" / "runs" / "behind@1" / "checkpoints"
    _wait_for(ckpts / FIRST_CKPT, proc)
    proc.send_signal(signal.SIGKILL)  # perhaps while the next one is being written: never half of one
    proc.communicate()
    for ck in ckpts.iterdir():
        if not ck.name.startswith("."):
            assert {"state.json", "rng.pt", ".metadata"} <= set(sealed.sealed_names(ck)), ck
            assert not [f for f in ck.iterdir() if not f.name.endswith(sealed.SUFFIX)], ck  # nothing in the clear
    d = run(cli, train_home, "tiny-dense", *LONG, *bg, "--name", "behind", "--resume")
    assert d["resumed_from"] >= 4 and d["status"] == "done"
    assert losses(train_home, "behind@1") == whole_losses


def test_ctrl_c_stops_at_a_checkpoint_and_resume_finishes(train_home, cli):
    import signal

    proc = _spawn(train_home, "tiny-dense", *LONG, "--name", "stopped")
    _wait_for(train_home / "artifacts" / "runs" / "stopped@1" / "checkpoints" / FIRST_CKPT, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped at step" in err and "--resume" in err and "Traceback" not in err
    runs = cli("--home", train_home, "--json", "train", "runs", "--name", "stopped").json["runs"]
    step = runs[0]["step"]
    assert runs[0]["status"] == "interrupted" and 4 <= step < 16
    assert (train_home / "artifacts" / "runs" / "stopped@1" / "checkpoints" / f"step-{step:08d}").is_dir()
    d = run(cli, train_home, "tiny-dense", *LONG, "--name", "stopped", "--resume")
    assert d["resumed_from"] == step and d["status"] == "done"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(train_home, cli, parallel):

    args = ["tiny-dense", "--train.max_steps", "3", *FAST]
    one = run(cli, train_home, *args, "--name", "one")
    two = run(cli, train_home, *args, "--name", "two", "--gpus", "2", "--train.parallel", parallel)
    assert two["world"] == 2
    assert losses(train_home, "two@1") == pytest.approx(losses(train_home, "one@1"), rel=1e-6)
    a, b = weights(train_home, one["model_path"]), weights(train_home, two["model_path"])
    assert a.keys() == b.keys()
    import torch

    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_activation_checkpointing_changes_memory_not_math(train_home, cli):
    args = ["tiny-dense", "--train.max_steps", "3", *FAST]
    run(cli, train_home, *args, "--name", "plain")
    run(cli, train_home, *args, "--name", "recompute", "--train.activation_checkpointing", "true")
    assert losses(train_home, "recompute@1") == pytest.approx(losses(train_home, "plain@1"), rel=1e-6)
    run(cli, train_home, *args, "--name", "half", "--train.precision", "bf16")  # autocast, fp32 master weights
    assert losses(train_home, "half@1") == pytest.approx(losses(train_home, "plain@1"), rel=1e-2)


def test_a_busy_vault_says_so(train_home):
    from tests.conftest import PY, python_env

    with open_vault(train_home):
        p = subprocess.run([PY, "-m", "appliance", "--home", str(train_home), "train", "runs"], env=python_env(),
                           capture_output=True, text=True)
    assert p.returncode == 1 and "in use by another appliance process" in p.stderr and "Traceback" not in p.stderr


def test_ctrl_c_at_the_launcher_stops_every_rank_at_a_checkpoint(train_home, cli, whole_losses):
    import signal

    sharded = ["--gpus", "2", "--train.parallel", "fsdp"]
    proc = _spawn(train_home, "tiny-dense", *LONG, "--name", "dstop", *sharded)
    _wait_for(train_home / "artifacts" / "runs" / "dstop@1" / "checkpoints" / FIRST_CKPT, proc)
    proc.send_signal(signal.SIGINT)  # the launcher only: torchrun and the ranks are in a session of their own
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = cli("--home", train_home, "--json", "train", "runs", "--name", "dstop").json["runs"][0]["step"]
    assert 4 <= step < 16
    assert (train_home / "artifacts" / "runs" / "dstop@1" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not list((train_home / "tmp").glob("train-*.sock"))  # the socket is gone with the run
    d = run(cli, train_home, "tiny-dense", *LONG, "--name", "dstop", "--resume", *sharded)  # rank 0 reads, shards
    assert d["resumed_from"] == step and d["status"] == "done"
    assert losses(train_home, "dstop@1") == pytest.approx(whole_losses, rel=1e-6)


def test_a_failure_in_the_ranks_is_one_clear_line(train_home, cli):
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--gpus", "2", "--train.max_steps", "3",
            "--train.lr", "1e30", "--train.min_lr", "0", "--train.warmup_steps", "0", "--train.grad_clip", "0")
    assert r.code == 1 and r.err.splitlines()[-1].startswith("error: loss became") and "Traceback" not in r.err
    assert cli("--home", train_home, "--json", "train", "runs").json["runs"][-1]["status"] == "failed"
