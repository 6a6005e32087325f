"""No training or quantizing path reaches for the network: every socket but a local Unix one fails, and is logged."""

import subprocess
import textwrap

from tests.conftest import PY, python_env

GUARD = textwrap.dedent('''
    import os, socket

    _log = os.environ["NETGUARD_LOG"]

    def _deny(what, target):
        with open(_log, "a") as f:
            f.write(f"{what} {target!r}\\n")
        raise OSError(f"network disabled: {what} {target!r}")

    _connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return _connect(self, address)
        _deny("connect", address)

    def connect_ex(self, address):
        if self.family == socket.AF_UNIX:
            return _connect(self, address) or 0
        _deny("connect_ex", address)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = lambda host, *a, **k: _deny("getaddrinfo", host)
    socket.create_connection = lambda address, *a, **k: _deny("create_connection", address)
''')

SCRIPT = textwrap.dedent('''
    import sys
    from appliance.cli import main

    def call(*args):
        try:
            main(list(args))
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"{args} exited {e.code}")

    home = sys.argv[1]
    call("--home", home, "train", "tokenizer", "--dataset", "handbook", "--vocab", "1500", "--name", "offline")
    fast = ["--train.max_steps", "2", "--train.warmup_steps", "1", "--json"]
    call("--home", home, "train", "run", "tiny-dense", "--data.tokenizer", "offline", *fast)
    call("--home", home, "train", "run", "sft-lora", "--model.base", "tiny-dense", *fast)
    call("--home", home, "train", "run", "sft-qlora", "--model.base", "tiny-dense", *fast)
    plain = sys.argv[2] + "/tiny-dense"  # artifacts are sealed: a base leaves in the clear only on purpose
    call("--home", home, "model", "export", "tiny-dense@1", "--out", plain)
    call("--home", home, "train", "import", plain, "--name", "imported")
    call("--home", home, "train", "run", "continue", "--model.base", "imported", "--data.datasets", "mail",
         "--data.seq_len", "128", "--train.batch_size", "4", *fast)
    import os
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from appliance import sealed
    from appliance.home import Home
    from appliance.vault import Vault
    with Vault.open(Home(Path(home)), os.environ["APPLIANCE_PASSPHRASE"], read_only=True), \
            sealed.opened(Path(home + "/artifacts/models/sft-lora-merged@1")) as merged:  # in memory
        AutoModelForCausalLM.from_pretrained(str(merged))
        AutoTokenizer.from_pretrained(str(merged))
    call("--home", home, "--json", "quantize", "sft-lora-merged@1", "--type", "q4_k_m", "--imatrix", "handbook",
         "--eval-tokens", "256")
    call("--home", home, "generate", "sft-lora-merged@1:q4_k_m-imatrix", "The permit", "--max-tokens", "4")
    print("ALL-DONE")
''')


def test_training_and_quantizing_never_touch_the_network(train_home, tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = python_env()
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        env.pop(k, None)  # the appliance must set these itself
    env["PYTHONPATH"] = f"{guard}:{env['PYTHONPATH']}"
    env["NETGUARD_LOG"] = str(log)
    p = subprocess.run([PY, "-c", SCRIPT, str(train_home), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ALL-DONE" in p.stdout
    assert not log.exists(), log.read_text()


def test_the_guard_itself_catches_a_connection(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {**python_env(), "PYTHONPATH": str(guard), "NETGUARD_LOG": str(log)}
    p = subprocess.run([PY, "-c", "import socket; socket.create_connection(('example.org', 80))"], env=env,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "example.org" in log.read_text()
