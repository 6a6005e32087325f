"""benchmarks/gpu_smoke.py: says so and exits cleanly without a GPU; --smoke runs every part on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import python_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def _run(*args):
    from tests.test_train_dist import _free_port

    env = {**python_env(), "SMOKE_PORT": str(_free_port())}
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_without_a_gpu_it_measures_nothing_and_exits_cleanly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, _ = _run()
    assert code == 0 and out["gpu"] is False and "no GPU" in out["note"]


@pytest.mark.slow
def test_smoke_runs_every_part():
    code, out, err = _run("--smoke")
    assert code == 0 and out["ok"], err[-2000:]
    assert out["fsdp"]["resume_identical"] and any(f.endswith(".distcp") for f in out["fsdp"]["checkpoint_files"])
    assert out["packing"]["isolated"]
    assert {(a, b) for _, a, b in out["moe"]["expert_kernels"]} == {("torch.bfloat16", "torch.bfloat16")}
    assert out["qlora"]["dtypes"]["adapter"] == ["torch.float32"]
