"""Train: pick data, recipe and method, launch a job; watch its loss curve, tokens/s and ETA; stop, resume.

Runs are jobs (appliance.jobs): they go on when the console closes and are listed here when it reopens.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Select, Static

from appliance.tui import actions, fmt
from appliance.tui.pages import Page
from appliance.tui.plot import LinePlot

METHODS = ["recipe's own", "full", "lora", "qlora"]


def launch_spec(recipe: str, dataset: str | None, method: str, steps: str) -> dict:
    """The form's choices as a job spec: recipe overrides, the same the CLI takes."""
    overrides = []
    if dataset:
        overrides.append(f"data.datasets={dataset}")
    if method in ("full", "lora", "qlora"):
        overrides.append(f"method={method}")
    if steps.strip():
        overrides.append(f"train.max_steps={steps.strip()}")
    return {"recipe": recipe, "overrides": overrides}


def progress(con, job) -> dict | None:
    """The live numbers of a training job's run: losses, step of max, tokens/s and an ETA."""
    if not job.ref:
        return None
    from appliance.train.run import metrics

    row = con.execute("SELECT step, max_steps, status FROM train_runs WHERE id = ?", [job.ref]).fetchone()
    if row is None:
        return None
    m = metrics(con, job.ref)
    step, max_steps, status = row
    recent = [x["tokens_per_s"] for x in m[-10:]]
    tps = sum(recent) / len(recent) if recent else None
    per_step = m[-1]["elapsed"] / max(1, len(m)) if m else None
    eta = per_step * (max_steps - step) if per_step and job.status == "running" else None
    vals = [x["val_loss"] for x in m if x["val_loss"] is not None]
    return {"run": job.ref, "losses": [x["loss"] for x in m], "step": step, "max_steps": max_steps,
            "status": status, "tokens_per_s": tps, "eta": eta, "loss": m[-1]["loss"] if m else None,
            "val_loss": vals[-1] if vals else None}


class TrainScreen(Page):
    MODE = "train"
    REFRESH_EVERY = 1.0
    BINDINGS = actions.bindings("train")

    def __init__(self):
        super().__init__()
        self.selected: str | None = None
        self.options_loaded = False

    def compose_page(self) -> ComposeResult:
        with Horizontal(classes="form"):
            yield Select([], prompt="dataset", id="dataset", compact=True)
            yield Select([], prompt="recipe", id="recipe", compact=True)
            yield Select([(m, m) for m in METHODS], value=METHODS[0], allow_blank=False, id="method", compact=True)
            yield Input(placeholder="steps", id="steps", type="integer", compact=True)
            yield Input(placeholder="gpus", id="gpus", type="integer", compact=True)
        yield DataTable(id="train-jobs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="train-stats", markup=False)
        yield LinePlot(id="loss-plot")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#train-jobs", DataTable).add_columns("job", "status", "what", "run", "step", "loss")

    def load(self, vault) -> dict:
        from appliance.jobs import queue
        from appliance.train.config import shipped
        from appliance.vault.versions import datasets

        jobs = [j for j in queue.listing(vault.con, limit=50) if j.kind == "train"]
        chosen = next((j for j in jobs if j.id == self.selected), jobs[0] if jobs else None)
        live = {j.id: progress(vault.con, j) for j in jobs[:10]}
        return {"jobs": jobs, "live": live, "chosen": chosen.id if chosen else None,
                "datasets": [d["name"] for d in datasets(vault.con)], "recipes": list(shipped())}

    def show(self, data: dict) -> None:
        if not self.options_loaded:
            self.query_one("#dataset", Select).set_options([(d, d) for d in data["datasets"]])
            self.query_one("#recipe", Select).set_options([(r, r) for r in data["recipes"]])
            self.options_loaded = True
        t = self.query_one("#train-jobs", DataTable)
        t.clear()
        for j in data["jobs"]:
            p = data["live"].get(j.id)
            t.add_row(j.id, j.status, j.describe(), j.ref or "", f"{p['step']}/{p['max_steps']}" if p else "",
                      f"{p['loss']:.4f}" if p and p["loss"] is not None else "", key=j.id)
        ids = [j.id for j in data["jobs"]]
        if data["chosen"] in ids:  # the selection follows the job, not the row number
            t.move_cursor(row=ids.index(data["chosen"]))
        p = data["live"].get(data["chosen"]) if data["chosen"] else None
        stats = self.query_one("#train-stats", Static)
        if p:
            loss = "-" if p["loss"] is None else f"{p['loss']:.4f}"
            if p["val_loss"] is not None:
                loss += f" (val {p['val_loss']:.4f})"
            stats.update(f"{data['chosen']} {p['run']} ({p['status']}): step {p['step']}/{p['max_steps']}  "
                         f"loss {loss}  {fmt.rate(p['tokens_per_s'])}  ETA {fmt.seconds(p['eta'])}")
            self.query_one(LinePlot).set_values(p["losses"])
        else:
            stats.update("no training jobs yet: choose a dataset and recipe, then launch" if not data["jobs"] else "")
            self.query_one(LinePlot).set_values([])

    @on(DataTable.RowHighlighted, "#train-jobs")
    def job_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key and event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self.action_refresh()

    def _selected_job(self) -> str | None:
        if self.selected is None:
            self.notify("select a job first", severity="warning")
        return self.selected

    # --- launch, stop, resume -------------------------------------------------------------------
    def action_launch(self) -> None:
        recipe = self.query_one("#recipe", Select).value
        if recipe is Select.BLANK:
            self.notify("choose a recipe first", severity="warning")
            return
        dataset = self.query_one("#dataset", Select).value
        spec = launch_spec(str(recipe), None if dataset is Select.BLANK else str(dataset),
                           str(self.query_one("#method", Select).value), self.query_one("#steps", Input).value)
        gpus = self.query_one("#gpus", Input).value.strip()
        self._submit(spec, int(gpus) if gpus else 0)

    @work(thread=True, group="submit")
    def _submit(self, spec: dict, gpus: int) -> None:
        from appliance.jobs import queue
        from appliance.jobs.dispatch import dispatch

        def go(v):
            job = queue.submit(v, "train", spec, gpus)
            started = dispatch(v)
            return job.id, job.id in started

        got = self.app.with_vault(go, write=True)
        if got:
            self.selected = got[0]
            self.app.call_from_thread(self.notify, f"{got[0]} {'started' if got[1] else 'queued'}")
            self.app.call_from_thread(self.action_refresh)

    def action_stop(self) -> None:
        if job_id := self._selected_job():
            self._job_op("cancel", job_id)

    def action_resume(self) -> None:
        if job_id := self._selected_job():
            self._job_op("resume", job_id)

    @work(thread=True, group="submit")
    def _job_op(self, op: str, job_id: str) -> None:
        from appliance.jobs import queue
        from appliance.jobs.dispatch import dispatch

        def go(v):
            if op == "cancel":
                return queue.cancel(v, job_id)
            job = queue.resubmit(v, job_id)
            dispatch(v)
            return job

        job = self.app.with_vault(go, write=True)
        if job:
            self.selected = job.id
            what = {"cancel": "asked to stop" if job.status == "running" else job.status}.get(op, "resumes as")
            self.app.call_from_thread(self.notify, f"{job_id} {what}" + (f" {job.id}" if op == "resume" else ""))
            self.app.call_from_thread(self.action_refresh)
