"""`python -m appliance.jobs.runner HOME JOB_ID`: the detached process that does one job.

Started by `dispatch` with the vault's secrets on stdin. It runs the same library function the CLI
command would, writes progress to the job's sealed log, records the outcome in the job row, and then
dispatches the queue again so the next job starts as soon as this one frees its GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.home import Home
from appliance.jobs import queue
from appliance.jobs.dispatch import dispatch
from appliance.jobs.log import JobLog


def run_train(vault, job: queue.Job, log: JobLog) -> dict:
    from appliance.train.config import build_recipe
    from appliance.train.run import run

    recipe = build_recipe(dict(job.spec["recipe"]))
    every = max(1, recipe.train.max_steps // 20)

    def on_event(kind: str, d: dict) -> None:
        if kind == "start":
            queue.set_ref(vault, job.id, d["id"])
            log.write(f"run {d['id']}: {d['max_steps']} steps on {d['world']} process(es)"
                      + (f", resuming at step {d['resume_from']}" if d.get("resume_from") else ""))
        elif kind == "step" and (d["step"] % every == 0 or d["step"] == recipe.train.max_steps):
            log.write(f"step {d['step']}/{recipe.train.max_steps}  loss {d['loss']:.4f}  "
                      f"{d['tokens_per_s']:,.0f} tok/s  eta {d['eta']:.0f} s")
        elif kind == "checkpoint":
            log.write(f"checkpoint at step {d['step']}")
        elif kind == "stage":
            log.write(d["text"])
        elif kind == "warning":  # over-fitting and the like: said in the log the operator follows
            log.write(f"warning at step {d['step']}: {d['text']}")

    res = run(vault, recipe, resume=job.spec.get("resume", False), gpus=job.gpus, on_event=on_event,
              resume_run=job.spec.get("run"))
    return res.to_json()


def _stage_progress(log: JobLog):
    last: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if last.get(stage) is None or done >= total or done - last[stage] >= max(1, total // 10):
            last[stage] = done
            log.write(f"{stage}: {done}/{total}")
    return progress


def run_quantize(vault, job: queue.Job, log: JobLog) -> dict:
    from appliance.quantize.stage import quantize

    s = job.spec
    queue.set_ref(vault, job.id, s["model"])
    res = quantize(vault, s["model"], s["type"], s.get("imatrix"), s.get("eval"), progress=_stage_progress(log))
    queue.set_ref(vault, job.id, res.id)
    log.write(f"{res.id}: {res.bits_per_weight:.2f} bits/weight{', flagged' if res.flagged else ''}")
    return res.to_json()


def run_eval(vault, job: queue.Job, log: JobLog) -> dict:
    from appliance import refs
    from appliance.eval.metrics import load_plugins
    from appliance.eval.run import run
    from appliance.eval.suite import from_dataset, load

    load_plugins()
    s = job.spec
    suite = from_dataset(vault.con, s["suite"]) if refs.is_dataset_suite(s["suite"]) else load(s["suite"])
    res = run(vault, suite, s["model"], progress=_stage_progress(log))
    queue.set_ref(vault, job.id, res["id"])
    log.write(f"{res['id']}: {res['passed']}/{res['cases']} cases passed")
    return {k: v for k, v in res.items() if k != "case_results"}


def run_sweep(vault, job: queue.Job, log: JobLog) -> dict:
    """Each point a training run (ranked by validation loss); the sweep a lineage node over its trials."""
    from appliance.train.run import TrainInterrupted, run
    from appliance.train.sweep import rank, trial_recipe
    from appliance.vault import lineage

    s = job.spec
    queue.set_ref(vault, job.id, s["name"])
    results = []
    for i, point in enumerate(s["points"], 1):
        recipe = trial_recipe(s["recipe"], point, f"{s['name']}-t{i}")
        earlier = _trial_runs(vault, recipe.name)  # a recovered sweep: finished trials count, unfinished resume
        if "done" in earlier:
            results.append(_trial(vault, earlier["done"], i, point))
            log.write(f"trial {i}: {earlier['done']} finished before; kept")
            continue
        log.write(f"trial {i}/{len(s['points'])}: " + ", ".join(f"{k}={v}" for k, v in point.items()))
        try:
            res = run(vault, recipe, resume="unfinished" in earlier, resume_run=earlier.get("unfinished"),
                      gpus=job.gpus)
        except TrainInterrupted:
            log.write(f"stopped during trial {i}; done so far: {len(results)}")
            raise
        except Exception as e:  # noqa: BLE001 - a diverged trial is a result, not the end of the sweep
            results.append({"trial": i, "point": point, "run": None, "error": str(e), "final_val_loss": None})
            log.write(f"trial {i} failed: {e}")
            continue
        t = _trial(vault, res.id, i, point)
        results.append(t)
        log.write(f"trial {i}: {res.id} validation loss {t['final_val_loss']} (best {t['best_val_loss']})"
                  + (f", stopped early at step {t['stopped_early']}" if t["stopped_early"] else ""))
    ranked = rank(results)
    if ranked[0].get("final_val_loss") is None:
        raise ApplianceError(f"every trial of {s['name']} failed", "see `appliance jobs logs`")
    with vault.session(wait=600) as v, v.transaction():
        sweep_id = lineage.next_id(v.con, s["name"])
        lineage.add_node(v.con, sweep_id, "sweep", [(r["run"], "trial") for r in ranked if r["run"]],
                         attrs={"space": s["space"], "method": s["method"], "ranking": ranked, "best": ranked[0]})
        v.audit("train.sweep", [sweep_id, ranked[0]["run"]], {"trials": len(results), "best": ranked[0]["run"]})
    queue.set_ref(vault, job.id, sweep_id)
    log.write(f"{sweep_id}: best {ranked[0]['run']} (validation loss {ranked[0]['final_val_loss']:.4f})")
    return {"id": sweep_id, "best": ranked[0], "ranking": ranked}


def _trial_runs(vault, name: str) -> dict[str, str]:
    with vault.session(wait=600) as v:
        rows = v.con.execute("SELECT id, status FROM train_runs WHERE name = ? ORDER BY created DESC",
                             [name]).fetchall()
    out: dict[str, str] = {}
    for run_id, status in rows:
        out.setdefault("done" if status == "done" else "unfinished", run_id)
    return out


def _trial(vault, run_id: str, i: int, point: dict) -> dict:
    from appliance.vault import lineage

    with vault.session(wait=600) as v:
        m = lineage.node(v.con, run_id)["attrs"]["metrics"]
    return {"trial": i, "point": point, "run": run_id, "best_val_loss": m.get("best_val_loss"),
            "final_val_loss": m.get("final_val_loss"), "steps": m["steps"], "stopped_early": m.get("stopped_early")}


KINDS = {"train": run_train, "quantize": run_quantize, "eval": run_eval, "sweep": run_sweep}


def main(argv: list[str]) -> int:
    from appliance.hardening import protect_process
    from appliance.vault.keys import Secrets

    protect_process()  # the key arrives on stdin next
    home, job_id = Home(Path(argv[0])), argv[1]
    secrets = Secrets.from_bytes(sys.stdin.buffer.read())
    log = JobLog(home.logs, job_id, secrets.data_key)
    try:
        return _run(home, job_id, secrets, log)
    except BaseException as e:  # noqa: BLE001 - stderr goes nowhere: the log is the only trace
        log.write(f"{job_id} runner stopped: {_line(e)}; the next dispatch recovers the job")
        return 1


def _line(e: BaseException) -> str:
    if isinstance(e, ApplianceError):
        return str(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _preload() -> None:
    """Import what every kind of job needs before attaching: torch and transformers take seconds to import
    (far more on a busy machine), and the vault should not be held from everyone else meanwhile."""
    from transformers import (  # noqa: F401 - each resolves lazily otherwise
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaForCausalLM,
        MixtralForCausalLM,
        PreTrainedTokenizerFast,
    )

    import appliance.eval.run  # noqa: F401
    import appliance.quantize.stage  # noqa: F401
    import appliance.train.run  # noqa: F401
    import appliance.train.stages  # noqa: F401


def _run(home: Home, job_id: str, secrets, log: JobLog) -> int:
    from appliance.train.run import TrainInterrupted
    from appliance.vault import Vault

    _preload()
    with Vault.from_secrets(home, secrets, wait=600) as vault:
        job = queue.get(vault.con, job_id)
        if job.status != "running" or job.pid != os.getpid():  # the dispatcher that started us did not commit
            log.write(f"{job_id} is {job.status} (pid {job.pid}), not this runner's (pid {os.getpid()}); leaving it")
            return 1
        log.write(f"{job_id} started: {job.describe()}")
        status, result, error = "done", None, None
        try:
            result = KINDS[job.kind](vault, job, log)
        except TrainInterrupted as e:
            status, error = "interrupted", e.message
        except BaseException as e:  # noqa: BLE001 - whatever happens, the row must say so
            status, error = "failed", _line(e)
        with vault.session(wait=3600):
            job = queue.finish(vault, job_id, status, result, error)
            log.write(f"{job_id} {job.status}" + (f": {error}" if error else ""))
            dispatch(vault)
    return 0 if status == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
