"""`appliance jobs submit|list|show|logs|cancel|resume|work`: thin over `appliance.jobs`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from appliance.cli import Ctx, _overrides, cli, command
from appliance.output import err, out, table


@cli.group("jobs")
def jobs_group():
    """Queued work that outlives the shell (and the console) that started it."""


@command(jobs_group, "submit", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("recipe")
@click.option("--gpus", type=click.IntRange(0, 64), default=0, show_default=True,
              help="GPUs the run needs (0: CPU). It starts when that many are free.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher starts first.")
@click.option("--resume", is_flag=True, help="Continue the newest unfinished run of the recipe's name.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable); "
                                                                       "also --KEY VALUE.")
@click.pass_context
def jobs_submit_cmd(ctx, c: Ctx, recipe, gpus, priority, resume, sets):
    """Queue a training run of RECIPE (a shipped recipe name or a TOML file) and return at once."""
    from appliance import api
    from appliance.jobs import queue
    from appliance.train.config import load_recipe

    overrides = _overrides(sets, ctx.args)
    queue.check_spec("train", {"recipe": recipe, "overrides": overrides})  # refused before the passphrase
    for note in load_recipe(recipe, overrides).notes:  # a warmup fitted to a shortened run, said once here
        err.print(f"note: {note}", markup=False)
    with c.open_vault() as v:
        job = api.jobs_submit(v, recipe, overrides, gpus, priority, resume)
    c.emit(job, f"{job['id']} {job['status']}: {queue.describe(job['kind'], job['spec'])}; "
                f"follow it with `appliance jobs logs {job['id']} -f`")


@command(jobs_group, "sweep")
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--gpus", type=click.IntRange(0, 64), default=0, show_default=True, help="GPUs each trial needs.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher starts first.")
def jobs_sweep_cmd(c: Ctx, sweep_file, gpus, priority):
    """Queue a hyperparameter sweep: grid or random points over recipe keys, ranked by validation loss.

    The file names the recipe, fixed overrides (train.eval_every is needed; train.early_stop_patience
    stops a trial that has stopped improving), the method and the [space] of values; see docs/JOBS.md.
    """
    from appliance import api
    from appliance.jobs import queue

    queue.check_spec("sweep", {"file": str(sweep_file)})  # a bad file is refused before the passphrase
    with c.open_vault() as v:
        job = api.jobs_sweep(v, file=sweep_file, gpus=gpus, priority=priority)
    c.emit(job, f"{job['id']} {job['status']}: {queue.describe(job['kind'], job['spec'])}; follow it with "
                f"`appliance jobs logs {job['id']} -f`")


@command(jobs_group, "list")
@click.option("--all", "all_", is_flag=True, help="Also the jobs that have ended.")
def jobs_list_cmd(c: Ctx, all_):
    """Running and queued jobs (starting any that now fit, and recovering any whose process is gone)."""
    from appliance import api
    from appliance.jobs import queue

    with c.open_vault() as v:
        data = api.jobs_list(v, all_)
    c.emit(data, lambda: table(["job", "status", "what", "gpus", "ref", "by", "error"], [
        [j["id"], j["status"], queue.describe(j["kind"], j["spec"]), j["gpus"] or "cpu", j["ref"] or "",
         j["submitted_by"], j["error"] or ""] for j in data["jobs"]]))


@command(jobs_group, "show")
@click.argument("job_id")
def jobs_show_cmd(c: Ctx, job_id):
    """One job: its spec, state and result."""
    from appliance import api

    with c.open_vault(read_only=True) as v:
        job = api.jobs_show(v, job_id)
    c.emit(job, lambda: out.print_json(data=job))


@command(jobs_group, "logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def jobs_logs_cmd(c: Ctx, job_id, follow):
    """A job's log (sealed on disk; opened with the vault's key)."""
    from appliance import api
    from appliance.errors import VaultBusy
    from appliance.jobs import queue
    from appliance.jobs.log import JobLog

    with c.open_vault(read_only=True) as v:
        res = api.jobs_logs(v, job_id)
    if not follow:
        return c.emit(res, lambda: [out.print(ln, markup=False) for ln in res["lines"]])
    log = JobLog(v.home.logs, job_id, v.secrets.data_key)

    from appliance.jobs.dispatch import runner_alive

    def ended() -> bool:
        try:
            with v.session(read_only=True, wait=5):
                j = queue.get(v.con, job_id)
        except VaultBusy:  # a job holds the vault for now: ask again on the next poll
            return False
        if j.status == "running" and j.pid and not runner_alive(j.pid, job_id):
            err.print(f"the runner of {job_id} is gone; `appliance jobs list` recovers the job", markup=False)
            return True
        return not j.active

    for line in log.follow(ended):  # with --json the lines go to stderr as they come: stdout holds one object
        (err if c.json else out).print(line, markup=False)
    if c.json:
        with v.session(read_only=True):
            c.emit(api.jobs_logs(v, job_id))


@command(jobs_group, "cancel")
@click.argument("job_id")
def jobs_cancel_cmd(c: Ctx, job_id):
    """Cancel a queued job, or ask a running one to stop (training stops at a checkpoint)."""
    from appliance import api

    with c.open_vault() as v:
        job = api.jobs_cancel(v, job_id)
    c.emit(job, f"{job_id}: {'cancelled' if job['status'] == 'cancelled' else 'asked to stop'}")


@command(jobs_group, "resume")
@click.argument("job_id")
def jobs_resume_cmd(c: Ctx, job_id):
    """Queue a stopped training job again; its run continues from the last checkpoint."""
    from appliance import api
    from appliance.jobs import queue

    with c.open_vault() as v:
        job = api.jobs_resume(v, job_id)
    c.emit(job, f"{job['id']} {job['status']}: {queue.describe(job['kind'], job['spec'])}")


@command(jobs_group, "work")
@click.option("--every", type=click.FloatRange(0.5, 3600), default=5.0, show_default=True,
              help="Seconds between looks at the queue.")
def jobs_work_cmd(c: Ctx, every):
    """Keep the queue moving until Ctrl-C (run it as a service so a rebooted box picks up its jobs)."""
    from appliance.errors import ApplianceError
    from appliance.jobs.dispatch import dispatch

    with c.open_vault() as v:
        v.close()
        out.print(f"watching the queue every {every:g} s; Ctrl-C to stop (running jobs go on)")
        while True:
            try:
                for job_id in dispatch(v):
                    out.print(f"started {job_id}")
            except (ApplianceError, OSError) as e:  # busy, or a runner that failed to start: try again later
                err.print(f"{time.strftime('%H:%M:%S')} {e}", markup=False)
            time.sleep(every)
