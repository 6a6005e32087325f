"""`appliance jobs submit|list|show|logs|cancel|resume|work`: thin over `appliance.api` (jobs)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import api
from appliance.cli.app import Ctx, cli, command, recipe_overrides
from appliance.cli.output import err, out, table


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
    overrides = recipe_overrides(sets, ctx.args)
    api.jobs_check("train", {"recipe": recipe, "overrides": overrides})  # refused before the passphrase
    for note in api.train_recipe_notes(recipe, overrides):  # a warmup fitted to a shortened run, said once here
        err.print(f"note: {note}", markup=False)
    with c.open_vault() as v:
        job = api.jobs_submit(v, recipe, overrides, gpus, priority, resume)
    c.emit(job, f"{job['id']} {job['status']}: {api.jobs_describe(job['kind'], job['spec'])}; "
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
    api.jobs_check("sweep", {"file": str(sweep_file)})  # a bad file is refused before the passphrase
    with c.open_vault() as v:
        job = api.jobs_sweep(v, file=sweep_file, gpus=gpus, priority=priority)
    c.emit(job, f"{job['id']} {job['status']}: {api.jobs_describe(job['kind'], job['spec'])}; follow it with "
                f"`appliance jobs logs {job['id']} -f`")


@command(jobs_group, "list")
@click.option("--all", "all_", is_flag=True, help="Also the jobs that have ended.")
def jobs_list_cmd(c: Ctx, all_):
    """Running and queued jobs (starting any that now fit, and recovering any whose process is gone)."""
    with c.open_vault() as v:
        data = api.jobs_list(v, all_)
    c.emit(data, lambda: table(["job", "status", "what", "gpus", "ref", "by", "error"], [
        [j["id"], j["status"], api.jobs_describe(j["kind"], j["spec"]), j["gpus"] or "cpu", j["ref"] or "",
         j["submitted_by"], j["error"] or ""] for j in data["jobs"]]))


@command(jobs_group, "show")
@click.argument("job_id")
def jobs_show_cmd(c: Ctx, job_id):
    """One job: its spec, state and result."""
    with c.open_vault(read_only=True) as v:
        job = api.jobs_show(v, job_id)
    c.emit(job, lambda: out.print_json(data=job))


@command(jobs_group, "logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def jobs_logs_cmd(c: Ctx, job_id, follow):
    """A job's log (sealed on disk; opened with the vault's key)."""
    with c.open_vault(read_only=True) as v:
        res = api.jobs_logs(v, job_id)
        if not follow:
            return c.emit(res, lambda: [out.print(ln, markup=False) for ln in res["lines"]])
        v.detach()  # attached only while it reads: the job writes its progress meanwhile

        def gone() -> None:
            err.print(f"the runner of {job_id} is gone; `appliance jobs list` recovers the job", markup=False)

        # with --json the lines go to stderr as they come: stdout holds one object
        for line in api.jobs_follow(v, job_id, on_gone=gone):
            (err if c.json else out).print(line, markup=False)
        if c.json:
            with v.session(read_only=True):
                c.emit(api.jobs_logs(v, job_id))


@command(jobs_group, "cancel")
@click.argument("job_id")
def jobs_cancel_cmd(c: Ctx, job_id):
    """Cancel a queued job, or ask a running one to stop (training stops at a checkpoint)."""
    with c.open_vault() as v:
        job = api.jobs_cancel(v, job_id)
    c.emit(job, f"{job_id}: {'cancelled' if job['status'] == 'cancelled' else 'asked to stop'}")


@command(jobs_group, "resume")
@click.argument("job_id")
def jobs_resume_cmd(c: Ctx, job_id):
    """Queue a stopped training job again; its run continues from the last checkpoint."""
    with c.open_vault() as v:
        job = api.jobs_resume(v, job_id)
    c.emit(job, f"{job['id']} {job['status']}: {api.jobs_describe(job['kind'], job['spec'])}")


@command(jobs_group, "work")
@click.option("--every", type=click.FloatRange(0.5, 3600), default=5.0, show_default=True,
              help="Seconds between looks at the queue.")
def jobs_work_cmd(c: Ctx, every):
    """Keep the queue moving until Ctrl-C (run it as a service so a rebooted box picks up its jobs)."""
    import time

    with c.open_vault() as v:
        v.detach()  # attached only while it looks at the queue
        out.print(f"watching the queue every {every:g} s; Ctrl-C to stop (running jobs go on)")
        api.jobs_work(v, every, on_started=lambda job_id: out.print(f"started {job_id}"),
             on_error=lambda e: err.print(f"{time.strftime('%H:%M:%S')} {e}", markup=False))
