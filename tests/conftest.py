"""Shared fixtures: the sample corpus (generated once), vault homes, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSPHRASE = "test passphrase 1234"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# As in every appliance process that holds keys (`hardening.protect_process`, which the in-process CLI calls
# here too): the children tests start see the same path, whichever test came first.
os.environ["PYTHONSAFEPATH"] = "1"


def _remember_unlocks() -> None:
    """Argon2id (64 MiB, t=3) takes about 0.3 s a derivation on these cores, and the in-process `cli` fixture
    unlocks a vault at every command: about a third of some test files went to deriving the same key again. In
    the test process the derivation is kept per (passphrase, salt, parameters): the same pure function, run once
    per vault; a wrong passphrase still derives its own, wrong, key. The appliance itself derives afresh each
    time; subprocesses (the CLI run as a program) are unchanged."""
    import hashlib

    from appliance.vault import keys

    derive, known = keys.Keyring._kek, {}

    def kek(self, passphrase: str) -> bytes:
        k = self.kdf
        at = (hashlib.sha256(passphrase.encode()).digest(), k.get("name"), k.get("salt"), k.get("iterations"),
              k.get("lanes"), k.get("memory_kib"))
        if at not in known:
            known[at] = derive(self, passphrase)
        return known[at]

    keys.Keyring._kek = kek


_remember_unlocks()


# The longest files first: two workers take files in collection order, so a long file collected last would
# run alone at the end with the other core idle (longest-first is the classic fix for that tail).
LONGEST_FIRST = ("test_benchmarks.py", "test_benchmarks_models.py",  # each about half of the benchmarks' smokes
                 "test_train_run.py", "test_tui.py", "test_sql_export_demo.py", "test_jobs.py", "test_agents.py",
                 "test_wheelhouse.py",
                 "test_sweep.py", "test_grpo.py", "test_quantize.py", "test_eval.py", "test_preference.py",
                 "test_tasks.py", "test_synth.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch):
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("APPLIANCE_PASSPHRASE_FILE", raising=False)
    monkeypatch.delenv("APPLIANCE_HOME", raising=False)
    monkeypatch.setenv("APPLIANCE_TRAIN_THREADS", "1")  # two shared cores: one thread per process


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    from appliance.samples import generate

    out = tmp_path_factory.mktemp("samples") / "corpus"
    generate(out)
    return out


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)


def command_of(args: list[str]) -> str:
    """The command path in a command line: `--home H --json vault show x` -> `vault show`."""
    import click

    from appliance.cli import cli as root

    node, path, i = root, [], 0
    while i < len(args) and isinstance(node, click.Group):
        a = args[i]
        if a == "--home":
            i += 2
            continue
        if not a.startswith("-") and a in node.commands:
            path.append(a)
            node = node.commands[a]
        i += 1
    return " ".join(path)


@pytest.fixture
def cli(capsys):
    """Run `appliance ARGS...` in-process; returns exit code, stdout, stderr.

    Every --json object printed is checked against the command's published schema (appliance/schemas).
    """
    from appliance.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = 0
        argv = [str(a) for a in args]
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        o, e = capsys.readouterr()
        if "--json" in argv and o.strip():
            _check_json(command_of(argv), o)
        return Result(code, o, e)

    return run


def _check_json(command: str, text: str) -> None:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if record := os.environ.get("APPLIANCE_RECORD_JSON"):
        with open(record, "a") as f:
            f.write(json.dumps({"cmd": command, "out": json.loads(lines[-1])}) + "\n")
        return
    from appliance.schemas import validate

    validate(command, json.loads(lines[-1]))


@pytest.fixture
def home(tmp_path, cli) -> Path:
    """A fresh, empty vault."""
    h = tmp_path / "home"
    r = cli("--home", h, "init")
    assert r.code == 0, r.err
    return h


@pytest.fixture(scope="session")
def filled_home(tmp_path_factory, samples) -> Path:
    """A vault with the whole sample corpus ingested as `corpus@1`; tests must not change it."""
    from appliance.home import Home
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    h = tmp_path_factory.mktemp("filled") / "home"
    with Vault.init(Home(h), PASSPHRASE) as v:
        ingest(v, [samples], "corpus")
    return h


@pytest.fixture(scope="session")
def train_base(tmp_path_factory, samples) -> Path:
    """A vault with `handbook@1` (prose), `handbook-qa@1` (pairs) and tokenizer `handbook-bpe@1`.

    Tests copy it with `train_home` and never change the original.
    """
    from appliance.home import Home
    from appliance.train.tokenizer import train_tokenizer
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    h = tmp_path_factory.mktemp("trainbase") / "home"
    with Vault.init(Home(h), PASSPHRASE) as v:
        ingest(v, [samples / "handbook", samples / "documents"], "handbook")
        ingest(v, [samples / "instructions" / "handbook-qa.jsonl"], "handbook-qa")
        ingest(v, [samples / "mail"], "mail")
        train_tokenizer(v, "handbook@1", vocab_size=2000)
    return h


def copy_home(src: Path, parent: Path) -> Path:
    """A private copy of a session home (`parent/home`), for a test that changes it."""
    import shutil

    h = parent / "home"
    shutil.copytree(src, h)
    return h


@pytest.fixture
def train_home(train_base, tmp_path) -> Path:
    return copy_home(train_base, tmp_path)


def open_vault(h: Path, read_only: bool = False):
    from appliance.home import Home
    from appliance.vault import Vault

    return Vault.open(Home(h), PASSPHRASE, read_only=read_only)


@contextlib.contextmanager
def artifact(h: Path, path):
    """A sealed artifact of home `h` (a model or tokenizer directory, or one file of it) opened in memory as the
    appliance opens it: the vault is opened for its key and closed again before the block runs."""
    from appliance import sealed

    with contextlib.ExitStack() as stack:
        with open_vault(h, read_only=True):
            p = stack.enter_context(sealed.opened(Path(path)))
        yield p


def artifact_bytes(h: Path, path) -> bytes:
    """One file of a sealed artifact of home `h`, decrypted."""
    with artifact(h, path) as p:
        return Path(p).read_bytes()


def python_env() -> dict:
    env = dict(os.environ)
    env["APPLIANCE_PASSPHRASE"] = PASSPHRASE
    env["APPLIANCE_TRAIN_THREADS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PY = sys.executable


@pytest.fixture(scope="module")
def gbase(train_base, tmp_path_factory) -> Path:
    """train_base plus `gb@1` (tiny, 30 steps on the handbook) and `gsft-merged@1` (LoRA SFT on handbook-qa)."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run as train

    h = copy_home(train_base, tmp_path_factory.mktemp("grpo"))
    fast = ["train.warmup_steps=1", "train.checkpoint_every=100"]
    with open_vault(h) as v:
        train(v, load_recipe("tiny-dense", ["name=gb", "train.max_steps=30", *fast]))
        train(v, load_recipe("sft-lora", ["name=gsft", "model.base=gb@1", "train.max_steps=20", *fast]))
    return h


@pytest.fixture
def ghome(gbase, tmp_path) -> Path:
    return copy_home(gbase, tmp_path)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's vocabulary-only GGUFs with expected tokenizations, which `make setup` extracts."""
    d = Path(os.environ.get("APPLIANCE_VOCAB_DIR") or Path.home() / ".cache" / "appliance" / "vocab")
    missing = [f for f in ("llama-bpe", "qwen2", "qwen35", "gpt-2", "llama-spm", "starcoder", "phi-3")
               if not (d / f"ggml-vocab-{f}.gguf.out").is_file()]
    if missing:
        pytest.fail(f"llama.cpp tokenizer test vectors ({', '.join(missing)}) are missing from {d}: run `make setup`",
                    pytrace=False)
    return d
