"""`appliance demo`: the end-to-end pipeline on the bundled sample corpus, in a home of its own.

Every stage that exists runs here; later stages (train, evaluate, quantize, bundle) join as they land.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.home import Home, user_data_dir

DEMO_MARKER = ".appliance-demo"
DEMO_PASSPHRASE = "demo passphrase - not a secret"


def demo_home(home_arg: Path | None) -> Home:
    """--home, else $APPLIANCE_HOME, else a demo directory beside (never inside) the default home."""
    if home_arg is not None:
        return Home(home_arg.expanduser().absolute())
    if env := os.environ.get("APPLIANCE_HOME"):
        return Home(Path(env).expanduser().absolute())
    return Home(user_data_dir() / "appliance-demo")


def reports_dir(home: Home) -> Path:
    """Where the demo puts the pictures it asks for (plots, the console's screens): beside the home, not in it,
    since nothing derived from vault data stays in the home in the clear (these are exports, made on purpose)."""
    return home.root.with_name(home.root.name + "-reports")


def _prepare(home: Home) -> None:
    """A demo always starts fresh, but only ever wipes a home (and reports) that an earlier demo made."""
    for d in (home.root, reports_dir(home)):
        if d.exists() and any(d.iterdir()):
            if not (d / DEMO_MARKER).exists():
                raise ApplianceError(f"{d} is not empty and was not made by `appliance demo`",
                                     "pass --home with a new or demo directory")
            shutil.rmtree(d)
    home.create_dirs()
    reports_dir(home).mkdir(mode=0o700, exist_ok=True)
    for d in (home.root, reports_dir(home)):
        (d / DEMO_MARKER).write_text("made by `appliance demo`; safe to delete\n")


# Training steps per stage. The full demo trains long enough for the model to answer the sample questions
# (about 30 of 36; the score is printed); --quick runs every stage with a few steps each, to check a box.
STEPS = {"pretrain": 300, "sft": 300, "dpo": 20, "grpo": 20, "task-sft": 150, "task-grpo": 15, "outside-sft": 40}
QUICK_STEPS = {"pretrain": 30, "sft": 30, "dpo": 5, "grpo": 5, "task-sft": 20, "task-grpo": 5, "outside-sft": 10}


def run_demo(home: Home, say: Callable[[str], None] = print, quick: bool = False) -> dict:
    from appliance.samples import generate
    from appliance.vault import Vault, audit, lineage, versions
    from appliance.vault.ingest import DEFAULT_VALIDATION, ingest

    passphrase = os.environ.get("APPLIANCE_PASSPHRASE") or DEMO_PASSPHRASE
    _prepare(home)
    summary: dict = {"home": str(home.root), "reports": str(reports_dir(home)), "quick": quick, "stages": []}
    steps = QUICK_STEPS if quick else STEPS
    t0 = time.time()

    last = t0

    def stage(name: str, detail: str, **data) -> None:  # seconds: since the stage before, so a slow one shows
        nonlocal last
        now = time.time()
        summary["stages"].append({"stage": name, "detail": detail, "seconds": round(now - last, 1), **data})
        last = now
        say(f"[green]✓[/] {name:<10} {detail}")

    say(f"demo home: {home.root}")
    if passphrase == DEMO_PASSPHRASE:
        say(f"passphrase: '{DEMO_PASSPHRASE}' (set APPLIANCE_PASSPHRASE to use your own)")
    with tempfile.TemporaryDirectory(prefix="appliance-samples-") as tmp:
        samples = Path(tmp) / "samples"
        manifest = generate(samples)
        stage("samples", f"{manifest['files']} synthetic files, {manifest['bytes'] // 1024} KiB "
                         f"(seed {manifest['seed']})")
        with Vault.init(home, passphrase) as v:
            stage("init", f"vault {v.keyring.vault_id} (Argon2id {v.keyring.kdf['memory_kib'] // 1024} MiB, "
                          f"t={v.keyring.kdf['iterations']}; DuckDB AES-GCM)")
            plan = [("handbook", [samples / "handbook"]),
                    ("handbook", [samples / "documents"]),  # a second version on top of the first
                    ("mail", [samples / "mail"]),
                    ("code", [samples / "kestrel-tools"]),
                    ("tables", [samples / "tables"]),
                    ("clinic", [samples / "clinic"]),  # ward and procedure notes: names in prose
                    ("handbook-qa", [samples / "instructions" / "handbook-qa.jsonl"]),
                    ("handbook-prefs", [samples / "preferences" / "handbook-prefs.jsonl"]),
                    ("task-demos", [samples / "tasks" / "asset-risk-demos.jsonl"])]
            for name, paths in plan:  # the worked episodes are all for training: none held out
                r = ingest(v, paths, name, validation_fraction=0.0 if name == "task-demos" else DEFAULT_VALIDATION)
                pii = ", ".join(f"{k} {n}" for k, n in r.pii.items()) or "none"
                stage("ingest", f"{r.version}: {r.records} records ({r.new_records} new, {r.duplicates} duplicates)"
                                f"; PII redacted: {pii}", version=r.version, records=r.records, pii=r.pii)
            info = versions.show(v.con, "tables")
            stage("tables", ", ".join(f"{t['table']} ({t['rows']} rows)" for t in info["tables"]))
            q = versions.sql(v.con, "SELECT kind, count(*) AS records FROM version_records r JOIN versions v "
                                    "USING (vid) WHERE v.status = 'committed' GROUP BY kind ORDER BY kind")
            stage("sql", "records by kind, all versions: " + ", ".join(f"{k} {n}" for k, n in q["rows"]))
            tree = lineage.tree(v.con, "handbook@2")
            stage("lineage", " <- ".join(_chain(tree)))
            _synth(v, samples.parent, stage)
            from appliance.train.tokenizer import train_tokenizer

            tok = train_tokenizer(v, "handbook@2", vocab_size=2000)
            stage("tokenizer", f"{tok.id}: byte-level BPE, {tok.vocab_size} tokens from {tok.records} records "
                               f"of {tok.dataset}", id=tok.id)
            base, merged = _train(v, tok.id, stage, steps)
            _agentic(v, base, stage, steps)
            gguf = _quantize(v, merged, stage)
            _evaluate(v, merged, gguf, stage)
            _ab(v, f"{merged}:q8_0", gguf, stage)
            _outside_base(v, samples, Path(tmp), stage, steps)
            _bundles(v, gguf, Path(tmp), stage)
            _jobs(v, tok.id, stage)
            _console(v, passphrase, stage)
            _agent(v, passphrase, stage)
            _operate(v, passphrase, Path(tmp), stage)
            rep = v.check()
            with v.transaction():
                v.audit("vault.check", [], {"ok": rep.ok, "problems": len(rep.problems)})
            if not rep.ok:
                raise ApplianceError("demo vault check failed: " + "; ".join(rep.problems[:3]))
            stage("check", f"{rep.blobs} records and {rep.versions} versions match their hashes")
            a = audit.verify(v.con, v.secrets.audit_key)
            if not a.ok:
                raise ApplianceError("demo audit verification failed: " + "; ".join(a.problems[:3]))
            stage("audit", f"{a.entries} entries, hash chain intact")
    summary["seconds"] = round(time.time() - t0, 1)
    say(f"done in {summary['seconds']} s. Try: appliance --home {home.root} vault datasets")
    return summary


def _synth(v, tmp: Path, stage: Callable[..., None]) -> None:
    """Synthetic data from the site's own tables: template Q&A under a site policy, then edge cases."""
    from appliance import api

    template, policy = tmp / "equipment-qa.toml", tmp / "policy.toml"
    template.write_text('[[qa]]\nquestion = "What is the risk class of {asset_id}?"\n'
                        'answer = "{asset_id} ({name}) is risk class {risk_class}."\n'
                        '[[qa]]\nquestion = "Who owns {name}?"\nanswer = "{owner} owns {name}."\n')
    policy.write_text('banned = ["decommissioned"]\ndisclaimer = "(Synthetic example from the asset register.)"\n')
    qa = api.synth_tables(v, "tables@1", template, "equipment-qa", "equipment", policy)
    edge = api.synth_edge_cases(v, "tables@1", "equipment-edge", "equipment", rows=50)
    pii = ", ".join(f"{k} {n}" for k, n in qa["pii"].items()) or "none"
    stage("synth", f"{qa['version']}: {qa['records']} Q&A pairs from {qa['source']} (template, policy: disclaimer; "
                   f"PII scrubbed: {pii}); {edge['version']}: {edge['records']} edge-case rows; both marked synthetic "
                   "in lineage", version=qa["version"], records=qa["records"], edge=edge["version"])


def _train(v, tokenizer_id: str, stage: Callable[..., None], steps: dict) -> tuple[str, str]:
    """Pre-train the tiny dense preset on the handbook, LoRA-tune it on the handbook Q&A pairs (long enough
    that it answers the sample questions, scored with the shipped `handbook-answers` suite),
    preference-tune that (DPO) toward the handbook's answers, then reinforce it (GRPO) with a reward for
    answers that match the handbook's; the last is the model that ships. Returns (pre-trained, shipped)."""
    from appliance.eval.run import run as evaluate
    from appliance.eval.suite import load
    from appliance.train.config import load_recipe
    from appliance.train.run import losses, metrics, run

    common = ["train.checkpoint_every=1000"]
    pre = load_recipe("tiny-dense", ["data.datasets=handbook@2", f"data.tokenizer={tokenizer_id}",
                                     f"train.max_steps={steps['pretrain']}", *common])
    r = run(v, pre)
    ls = losses(v.con, r.id)
    stage("pretrain", f"{r.id}: Llama-style 2 layers x 64, {r.steps} steps on handbook@2, loss {ls[0]:.2f} -> "
                      f"{ls[-1]:.2f}, {r.tokens_per_s:,.0f} tok/s, padding {r.data['padding_fraction']:.2%}",
          id=r.id, first_loss=ls[0], last_loss=ls[-1])
    sft = load_recipe("sft-lora", [f"model.base={r.id}", "data.datasets=handbook-qa@1",
                                   f"train.max_steps={steps['sft']}", *common])
    s = run(v, sft)
    ls = losses(v.con, s.id)
    e = evaluate(v, load("handbook-answers"), s.merged)
    stage("sft", f"{s.id}: LoRA r=8 on {r.id}, {len(ls)} steps on handbook-qa@1 (answers only), loss "
                 f"{ls[0]:.2f} -> {ls[-1]:.2f}; merged as {s.merged}; {e['id']}: answers {e['passed']}/{e['cases']} "
                 "sample questions", id=s.id, merged=s.merged, eval=e["id"], passed=e["passed"], cases=e["cases"])
    # a gentle rate on top of SFT: at the recipes' 5e-3, 20 DPO and 20 GRPO steps undo most of what SFT taught
    # (sample answers 21 -> 15 -> 2 of 36 in one run); at 5e-4, 21 -> 21 -> 20
    gentle = ["train.lr=5e-4", "train.min_lr=5e-5"]
    dpo = load_recipe("dpo-lora", [f"model.base={s.merged}", "data.datasets=handbook-prefs@1",
                                   f"train.max_steps={steps['dpo']}", *gentle, *common])
    p = run(v, dpo)
    ls = losses(v.con, p.id)
    stage("dpo", f"{p.id}: LoRA on {s.merged}, {len(ls)} steps on {p.data['pairs']} preference pairs of "
                 f"handbook-prefs@1 (reference: the base, adapters off), loss {ls[0]:.3f} -> {ls[-1]:.3f}; merged "
                 f"as {p.merged}", id=p.id, merged=p.merged, first_loss=ls[0], last_loss=ls[-1])
    grpo = load_recipe("grpo-lora", [f"model.base={p.merged}", "data.datasets=handbook-qa@1",
                                     f"train.max_steps={steps['grpo']}", *gentle, *common])
    g = run(v, grpo)
    rw = [m["reward"] for m in metrics(v.con, g.id)]
    first, last = sum(rw[:5]) / 5, sum(rw[-5:]) / 5
    stage("grpo", f"{g.id}: LoRA on {p.merged}, {len(rw)} steps, {grpo.grpo.group_size} sampled answers per prompt "
                  f"of handbook-qa@1, reward {'+'.join(grpo.grpo.rewards)} {first:.3f} (first 5 steps) -> {last:.3f} "
                  f"(last 5); merged as {g.merged}", id=g.id, merged=g.merged, first_reward=first, last_reward=last)
    return r.id, g.merged


def _agentic(v, base: str, stage: Callable[..., None], steps: dict) -> None:
    """The shipped agentic task: SFT on its worked episodes, then GRPO on the task itself (tools in the
    sandbox, reward: the episode succeeded); completion measured with `appliance eval` before and after."""
    from appliance.eval.run import run as evaluate
    from appliance.eval.suite import load
    from appliance.train.config import load_recipe
    from appliance.train.run import metrics, run

    common = ["train.checkpoint_every=1000"]
    suite = load("asset-risk")
    sft = run(v, load_recipe("sft-full", [f"model.base={base}", "name=task-sft", "data.datasets=task-demos@1",
                                          "data.seq_len=256", f"train.max_steps={steps['task-sft']}",
                                          "train.batch_size=4", "train.micro_batch_size=4", "train.lr=4e-3",
                                          "train.min_lr=4e-4", *common]))
    e1 = evaluate(v, suite, sft.id)
    before = e1["metrics"]["task_completion"]
    stage("task-sft", f"{sft.id}: full SFT of {base} on task-demos@1 (worked episodes of asset-risk), {sft.steps} "
                      f"steps; {e1['id']}: completion {before:.0%} of {e1['cases']} episodes (greedy, tools in the "
                      "sandbox)", id=sft.id, eval=e1["id"], completion=before)
    # 15 of the recipe's 30 steps: the demo shows the stage; benchmarks/agentic_task.py measures it in full
    recipe = load_recipe("grpo-task", [f"model.base={sft.id}", f"train.max_steps={steps['task-grpo']}", *common])
    g = run(v, recipe)
    rw = [m["reward"] for m in metrics(v.con, g.id)]
    first, last = sum(rw[:5]) / 5, sum(rw[-5:]) / 5
    e2 = evaluate(v, suite, g.merged)
    after = e2["metrics"]["task_completion"]
    stage("task-grpo", f"{g.id}: LoRA GRPO on the task, {len(rw)} steps, {recipe.grpo.group_size} plays per episode; "
                       f"sampled completion {first:.2f} (first 5 steps) -> {last:.2f} (last 5); {e2['id']} on "
                       f"{g.merged}: completion {before:.0%} -> {after:.0%}", id=g.id, merged=g.merged, eval=e2["id"],
          first_reward=first, last_reward=last, before=before, after=after)


def _quantize(v, model_id: str, stage: Callable[..., None]) -> str:
    """GGUF exports checked against the source model, then a completion through llama.cpp."""
    from appliance.quantize.infer import chat_turn, open_model
    from appliance.quantize.stage import quantize

    for qtype, imatrix in (("q8_0", None), ("q4_k_m", "handbook-qa@1")):
        r = quantize(v, model_id, qtype, imatrix_ref=imatrix)
        q = r.quality
        fell = (f"; {len(r.fallbacks)} tensors kept at {'/'.join(sorted({f['stored_as'] for f in r.fallbacks}))} "
                f"(rows of 64 do not fill 256-value k-quant blocks)" if r.fallbacks else "")
        stage("quantize", f"{r.id}: {r.size // 1024} KiB, {r.bits_per_weight:.2f} bits/weight; perplexity "
                          f"{q['ppl_delta_pct']:+.2f}% vs. the source, top-1 {q['top1_agreement']:.1%}, tokenizer "
                          f"{q['tokenizer_agreed']}/{q['tokenizer_records']} held-out records identical{fell}",
              id=r.id, path=r.path, quality=q)
    question = "What does the tarn valve do?"
    t0 = time.perf_counter()
    llm = open_model(Path(r.path), n_ctx=256, seed=1)
    text = "".join(chat_turn(llm, [{"role": "user", "content": question}], max_tokens=32, temperature=0.0))
    secs = time.perf_counter() - t0
    llm.close()
    stage("chat", f"llama.cpp on {r.id} ({secs:.2f} s, greedy): "
                  f"{question!r} -> {' '.join(text.split())[:90]!r}", text=text)
    return r.id


def _evaluate(v, model_id: str, gguf_id: str, stage: Callable[..., None]) -> None:
    """The shipped suite on the model and on its GGUF, a release gate between them, a drift baseline, plots."""
    from appliance.eval import drift, plots
    from appliance.eval.run import gate, run
    from appliance.eval.suite import load
    from appliance.train.run import losses

    suite = load("handbook-checks")
    a, b = run(v, suite, model_id), run(v, suite, gguf_id)
    for r in (a, b):
        m = r["metrics"]
        stage("eval", f"{r['id']}: {r['suite']} on {r['model']} ({r['backend']}): {r['passed']}/{r['cases']} cases, "
                      f"perplexity {m['perplexity']:.2f}, site-term coverage {m['vocab_coverage']:.0%}, "
                      f"{m['tokens_per_s']:,.0f} tok/s", id=r["id"], metrics=m)
    answers = [run(v, load("handbook-answers"), m) for m in (model_id, gguf_id)]
    for r in answers:
        stage("answers", f"{r['id']}: {r['suite']} on {r['model']} ({r['backend']}): answers {r['passed']}/"
                         f"{r['cases']} sample questions ({r['passed'] / r['cases']:.0%}; "
                         f"{_sample_answer(r)})", id=r["id"], passed=r["passed"], cases=r["cases"])
    g = gate(v.con, a["id"], b["id"], {}, 0.05)
    stage("gate", f"{b['id']} vs {a['id']}: {'passed' if g['ok'] else 'REGRESSED'} within 5 % "
                  f"(answers changed on {len(g['changed'])} of {b['cases']} cases)", ok=g["ok"])
    drift.check(v, model_id, None, "source", 0.2, 0.05, probes_n=8)  # the baseline: the source model
    d = drift.check(v, gguf_id, None, "source", 0.2, 0.05)
    out = reports_dir(v.home)
    plots.metrics_png([a, b], out / "eval.png")
    plots.loss_png({r: losses(v.con, r) for r in ("tiny-dense@1", "sft-lora@1")}, out / "loss.png")
    stage("drift", f"{gguf_id} against the baseline of {model_id} ({d['probes']} probes): answers changed "
                   f"{d['answer_change_rate']:.0%}, mean KL {d['mean_kl']:.4f}; plots in {out}", ok=d["ok"])


AB_QUESTIONS = ("What does the tarn valve do?", "Who owns the tarn valve?",
                "I am dana.reyes@example.com; what does the tarn valve do?")


def _ab(v, source: str, quant: str, stage: Callable[..., None], requests: int = 12) -> dict:
    """A short A/B in service: the q8_0 export (next to lossless: the source) answers half the conversations,
    the 4-bit one the other half, through the real server; every request is recorded scrubbed in the vault,
    and `eval ab` gives the verdict."""
    import json
    import socket
    import threading
    import urllib.request

    from appliance import api

    api.deploy_create(v, "demo-ab", source, quant, 0.5, record=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop, ids = threading.Event(), []

    def post(url: str, body: dict) -> dict:
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def drive(url: str) -> None:
        try:
            for i in range(requests):
                ids.append(post(f"{url}/chat/completions", {
                    "model": "demo-ab", "messages": [{"role": "user", "content": AB_QUESTIONS[i % len(AB_QUESTIONS)]}],
                    "max_tokens": 16, "temperature": 0, "user": f"operator-{i}"})["id"])
            post(f"{url}/feedback", {"id": ids[0], "rating": 4})
        finally:
            stop.set()

    done = api.serve_deployment(v, "demo-ab", port=port, threads=2, flush_records=8, flush_seconds=1.0,
                                on_ready=lambda url: threading.Thread(target=drive, args=(url,), daemon=True).start(),
                                stop=stop)
    r = api.eval_ab(v, "demo-ab", min_requests=3)
    a, b = r["arms"]["model"], r["arms"]["candidate"]
    stage("ab", f"demo-ab: {source} ({a['requests']} requests) vs {quant} ({b['requests']}), split 50 %, "
                f"{done['records']} records scrubbed into the vault: verdict {r['verdict']} ({r['reason']}); "
                f"latency {a['latency_ms']['mean'] or 0:.0f} vs {b['latency_ms']['mean'] or 0:.0f} ms",
          verdict=r["verdict"], records=done["records"])
    return r


def _outside_base(v, samples: Path, tmp: Path, stage: Callable[..., None], steps: dict) -> None:
    """The path most sites take: a base brought from outside (here a tiny Qwen2-style model built locally, with
    a Qwen2-style tokenizer and no chat template), imported, LoRA-tuned on vault data, merged and exported,
    with its quality report."""
    from appliance import api
    from appliance.quantize.stage import quantize
    from appliance.sample_bases import build
    from appliance.train.config import load_recipe
    from appliance.train.run import losses, run

    texts = [p.read_text() for p in sorted((samples / "handbook").rglob("*.md"))]
    src = build("qwen2", tmp / "site-qwen2-tiny", texts)
    imp = api.train_import(v, src, "site-qwen2")
    stage("import", f"{imp['id']}: {imp['architectures'][0]} from outside ({imp['base']['name']}, "
                    f"{'/'.join(imp['base']['weight_dtypes'])} safetensors, {len(imp['base']['files'])} files hashed "
                    "into lineage; no chat template: ChatML is given at fine-tuning)", id=imp["id"])
    s = run(v, load_recipe("sft-lora", [f"model.base={imp['id']}", "name=site-qwen2-sft",
                                        "data.datasets=handbook-qa@1", f"train.max_steps={steps['outside-sft']}",
                                        "train.checkpoint_every=1000"]))
    ls = losses(v.con, s.id)
    r = quantize(v, s.merged, "q8_0", eval_ref="handbook-qa@1")
    q = r.quality
    stage("import", f"{s.id}: LoRA on {imp['id']}, {len(ls)} steps, loss {ls[0]:.2f} -> {ls[-1]:.2f}; {r.id}: "
                    f"tokenizer {q['tokenizer_agreed']}/{q['tokenizer_records']} records and "
                    f"{q['tokenizer_hard_agreed']}/{q['tokenizer_hard_strings']} hard strings identical, perplexity "
                    f"{q['ppl_delta_pct']:+.2f}% vs. the source, top-1 {q['top1_agreement']:.1%}, mean KL "
                    f"{q['mean_kld']:.4f}", id=r.id, quality=q)


def _sample_answer(r: dict) -> str:
    """One answer of a run, quoted, so the score reads with an example beside it."""
    c = next((c for c in r["case_results"] if c["passed"]), r["case_results"][0])
    return f"{c['case']}: {' '.join(c['output'].split())[:70]!r}"


def _bundles(v, gguf_id: str, tmp: Path, stage: Callable[..., None]) -> None:
    """A site key, the GGUF out as a signed bundle, the Q&A data out encrypted, and back in."""
    from appliance import exchange

    with _key_passphrase("demo key passphrase - not a secret"):
        pub = exchange.generate_key(v, "demo-site")
        pub_file = exchange.keys_dir(v.home) / "demo-site.pub"
        exchange.trust_add(v, pub_file, "demo-site", ["gguf", "dataset"])
        out = v.home.root / "bundles"
        g = exchange.export_bundle(v, gguf_id, "demo-site", [pub_file], out / "gguf.bundle")  # sealed in transit too
        checked = exchange.verify_bundle(v, out / "gguf.bundle")
        stage("bundle", f"{g['out']}: {g['name']} v{g['version']}, {g['files']} files, signed by {pub.key_id}; "
                        f"verified against the trust store ({checked['bytes']:,} bytes)", bundle=g)
        d = exchange.export_bundle(v, "handbook-qa@1", "demo-site", [pub_file], out / "handbook-qa.bundle")
        back = exchange.import_bundle(v, out / "handbook-qa.bundle")
        same = v.con.execute("SELECT count(DISTINCT content_hash) FROM versions WHERE name = 'handbook-qa'"
                             ).fetchone()[0] == 1
        stage("bundle", f"{d['out']}: handbook-qa@1 encrypted to {pub.key_id}; imported as {back['id']} "
                        f"({back['records']} records, {'identical content hash' if same else 'DIFFERENT HASH'})",
              bundle=d, imported=back["id"])
        if not same:
            raise ApplianceError("demo dataset bundle did not round-trip")


def _jobs(v, tokenizer_id: str, stage: Callable[..., None]) -> None:
    """A training run as a job: a detached process that would outlive this one; the vault is let go meanwhile."""
    from appliance.jobs import queue
    from appliance.jobs.dispatch import dispatch
    from appliance.jobs.log import JobLog

    job = queue.submit(v, "train", {"recipe": "tiny-dense", "overrides": [
        "name=demo-job", "data.datasets=handbook@2", f"data.tokenizer={tokenizer_id}", "train.max_steps=20",
        "train.checkpoint_every=10"]})
    dispatch(v)
    t0 = time.time()
    with v.released():
        while True:
            time.sleep(0.5)
            try:
                with v.session(read_only=True, wait=5):
                    job = queue.get(v.con, job.id)
            except ApplianceError:  # the runner holds the vault for a moment
                continue
            if not job.active or time.time() - t0 > 600:
                break
    if job.status != "done":
        raise ApplianceError(f"demo job {job.id} ended {job.status}: {job.error}")
    lines = JobLog(v.home.logs, job.id, v.secrets.data_key).lines()
    stage("jobs", f"{job.id}: {job.describe()} in a detached runner -> {job.ref}, "
                  f"{job.result['steps']} steps in {time.time() - t0:.1f} s; {len(lines)} sealed log lines",
          id=job.id, ref=job.ref)


def _console(v, passphrase: str, stage: Callable[..., None]) -> None:
    """The operator's console, driven headless through every screen; a picture of each lands in the reports."""
    import asyncio

    from appliance.tui.app import ApplianceApp

    out = reports_dir(v.home)
    shown: list[str] = []

    async def tour() -> None:
        app = ApplianceApp(v.home)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press(*passphrase, "enter")
            for _ in range(400):
                await pilot.pause(0.05)
                if app.vault is not None:
                    break
            for key in "dvtmba":
                await pilot.press(key)
                await pilot.pause(0.8)
                shown.append(app.current_mode)
                app.save_screenshot(f"console-{app.current_mode}.svg", str(out))
            await pilot.press("q")

    with v.released():
        asyncio.run(tour())
    if shown != ["dashboard", "vault", "train", "models", "bundles", "audit"]:
        raise ApplianceError(f"demo console tour reached {shown}")
    stage("console", f"appliance tui: {len(shown)} screens at 80x24 ({', '.join(shown)}); pictures in {out}")


def _agent(v, passphrase: str, stage: Callable[..., None]) -> None:
    """An agent over MCP with a read-only grant: it lists what is there and is refused record text."""
    import asyncio
    import sys

    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from appliance import grants

    g = grants.create(v, "demo-agent", ["read"], hours=1)

    async def session() -> tuple[list[str], str]:
        env = {**os.environ, "APPLIANCE_PASSPHRASE": passphrase, "APPLIANCE_GRANT": g["token"]}
        env.pop("APPLIANCE_PASSPHRASE_FILE", None)
        params = StdioServerParameters(command=sys.executable, args=["-m", "appliance", "--home", str(v.home.root),
                                                                     "mcp"], env=env)
        with open(os.devnull, "w") as quiet:
            async with stdio_client(params, errlog=quiet) as (r, w), ClientSession(r, w) as s:
                await s.initialize()
                listed = (await s.call_tool("vault_datasets", {})).structured_content["datasets"]
                refused = await s.call_tool("vault_records", {"ref": "mail@1"})
                return [d["latest"] for d in listed], refused.content[0].text if refused.is_error else ""

    with v.released():
        latest, refused = asyncio.run(session())
    if "not granted 'records'" not in refused:
        raise ApplianceError("demo agent was not refused record text")
    stage("agent", f"agent:demo-agent over MCP ({g['id']}, read only): listed {', '.join(latest)}; "
                   f"refused record text ({refused.split('error: ', 1)[-1].split(' (')[0]})", grant=g["id"])


def _operate(v, passphrase: str, tmp: Path, stage: Callable[..., None]) -> None:
    """Running the box: doctor, a backup restored and checked elsewhere, and the offline installer."""
    from appliance import api

    with v.released():  # doctor opens the vault read-only, as an operator's second terminal would
        d = api.doctor(v.home.root, passphrase)
    n = d["counts"]
    stage("doctor", f"{n['ok']} ok, {n['warn']} warning(s), {n['fail']} failed: "
                    + ", ".join(c["check"] for c in d["checks"] if not c["check"].startswith("package ")))
    b = api.vault_backup(v, tmp / "demo.backup")
    r = api.vault_restore(tmp / "demo.backup", tmp / "restored", passphrase)
    stage("backup", f"{b['files']} files of the home in {b['size'] // 2**20} MiB, encrypted; restored elsewhere with "
                    f"{r['records']} records, {r['versions']} versions and {r['audit_entries']} audit entries "
                    "checked")
    # gigabytes, so built in the demo's temp directory and not kept (nor carried by later backups of the home)
    w = api.wheelhouse_build(tmp / "wheelhouse", from_env=True, compress_level=0, home=v.home.root)
    stage("wheelhouse", f"{w['wheels']} wheels of this environment ({w['bytes'] // 2**20} MiB, torch "
                        f"{w['torch']['version']}), hash-pinned and checked whole; "
                        "`appliance wheelhouse build --out DIR` writes one to keep", release=w["release"],
          wheels=w["wheels"])


@contextmanager
def _key_passphrase(default: str):
    """The demo's key passphrase, unless the operator set one; the environment is restored after."""
    old = os.environ.get("APPLIANCE_KEY_PASSPHRASE")
    if not old and not os.environ.get("APPLIANCE_KEY_PASSPHRASE_FILE"):
        os.environ["APPLIANCE_KEY_PASSPHRASE"] = default
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("APPLIANCE_KEY_PASSPHRASE", None)


def _chain(t: dict) -> list[str]:
    out = [t["id"]]
    while t["parents"]:
        t = t["parents"][0]
        out.append(t["id"])
    return out
