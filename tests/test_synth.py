"""`appliance synth`: template Q&A over real rows, edge cases, PII scrubbing, the site policy, lineage."""

from __future__ import annotations

import json

import pytest

from tests.conftest import open_vault


@pytest.fixture
def tables_home(home, cli, samples, tmp_path):
    assert cli("--home", home, "vault", "ingest", samples / "tables", "--dataset", "tables").code == 0
    assert cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "handbook").code == 0
    return home


def write(path, text: str):
    path.write_text(text)
    return path


QA = '''
[[qa]]
question = "What is the risk class of {asset_id}?"
answer = "{asset_id} ({name}) is risk class {risk_class}. Ask ops-desk@halvorsen-dyn.example."

[[qa]]
question = "Where is {name}?"
answer = "{name} is in {location}."
'''


def test_template_pairs_land_scrubbed_under_the_policy_with_lineage(tables_home, cli, tmp_path):
    tpl = write(tmp_path / "qa.toml", QA)
    policy = write(tmp_path / "policy.toml", 'banned = ["critical"]\ndisclaimer = "(Synthetic; check the register.)"\n')
    r = cli("--home", tables_home, "--json", "synth", "tables", "tables@1", "--table", "equipment", "--template", tpl,
            "--dataset", "eq-qa", "--policy", policy)
    assert r.code == 0, r.err
    d = r.json
    from appliance.vault.synth import source_table

    with open_vault(tables_home, read_only=True) as v:
        _, _, _, train = source_table(v.con, "tables@1", "equipment")
        held = {json.loads(m)["row"] for (m,) in v.con.execute(
            "SELECT meta FROM version_records WHERE path = 't1_equipment' AND split = 'validation'").fetchall()}
        held_ids = {a for (a,) in v.con.execute("SELECT asset_id FROM data.t1_equipment WHERE rowid + 1 IN "
                                                "(SELECT unnest(?))", [sorted(held)]).fetchall()}
        rows = v.con.execute(f"SELECT instruction, response FROM {d['table']}").fetchall()
    critical = sum(r["risk_class"] == "critical" for r in train)
    assert held_ids and len(train) + len(held_ids) == 240  # only the train split is used
    assert d["version"] == "eq-qa@1" and d["generated"] == 2 * len(train) and d["dropped"]["policy"] == critical
    assert d["records"] == len(rows) == 2 * len(train) - critical - d["dropped"].get("duplicate", 0)
    assert len(set(rows)) == len(rows)  # the same pair twice (two units of one name in one rack) lands once
    assert d["pii"] == {"EMAIL": len(train) - critical}
    assert not any(a in q for q, _ in rows for a in held_ids)
    assert all(a.endswith("(Synthetic; check the register.)") for _, a in rows)
    assert not any("critical" in q + a for q, a in rows)
    assert not any("@halvorsen-dyn.example" in q + a for q, a in rows)  # scrubbed before it landed
    first = train[0]["name"]
    assert (f"Where is {first}?", f"{first} is in {train[0]['location']}. (Synthetic; check the register.)") in rows
    node = cli("--home", tables_home, "--json", "lineage", "eq-qa@1").json["lineage"]
    assert node["kind"] == "dataset" and node["attrs"]["synthetic"] is True and node["attrs"]["generator"] == "tables"
    assert [(p["id"], p["role"]) for p in node["parents"]] == [("tables@1", "source")]
    assert node["attrs"]["policy"] == {"banned": 1, "disclaimer": True, "file": str(policy)}
    assert [e["action"] for e in cli("--home", tables_home, "--json", "audit", "log", "--action", "vault.synth")
            .json["entries"]] == ["vault.synth"]
    # ready for SFT: the default prompt/response columns of a chat recipe read it
    from appliance.train.config import DataConfig
    from appliance.train.data import chat_pairs

    with open_vault(tables_home, read_only=True) as v:
        pairs = list(chat_pairs(v.con, ["eq-qa@1"], DataConfig(datasets=["eq-qa@1"], format="chat")))
    assert len(pairs) == cli("--home", tables_home, "--json", "vault", "show", "eq-qa@1").json["splits"]["train"]


def test_edge_cases_cover_what_the_data_never_shows(home, cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = [("A", "auto", 20), ("A", "manual", 22), ("B", "auto", 25), ("B", "manual", 21), ("C", "auto", 30),
            ("A", "auto", 24), ("B", "auto", 23), ("C", "auto", 26)] * 3  # repeated: the validation split takes some
    owners = ["Ann Lee", "Bo Strand"]
    lines = ["site,mode,temp,owner"] + [f"{s},{m},{t},{owners[i % 2]}" for i, (s, m, t) in enumerate(data)]
    write(src / "readings.csv", "\n".join(lines) + "\n")
    # ingested without scrubbing: synth still scrubs every cell in its own column's context before using it
    assert cli("--home", home, "vault", "ingest", src, "--dataset", "plant", "--pii", "off").code == 0
    r = cli("--home", home, "--json", "synth", "edge-cases", "plant@1", "--dataset", "plant-edge", "--rows", "12")
    assert r.code == 0, r.err
    with open_vault(home, read_only=True) as v:
        got = v.con.execute(f"SELECT site, mode, temp, edge_case FROM {r.json['table']}").fetchall()
    assert r.json["records"] == len(got) and 6 <= len(got) <= 12  # identical rows land once
    assert r.json["pii"].get("PERSON", 0) > 0
    with open_vault(home, read_only=True) as v:
        text = str(v.con.execute(f"SELECT * FROM {r.json['table']}").fetchall())
    assert "Ann Lee" not in text and "Bo Strand" not in text
    assert ("C", "manual") in {(s, m) for s, m, _, _ in got}  # never seen together in the data
    assert any(e.startswith("unseen pair: site=C, mode=manual") for *_, e in got)
    temps = {t for _, _, t, _ in got}
    assert {20, 30} <= temps and min(temps) < 20 and max(temps) > 30  # at and past the observed extremes
    again = cli("--home", home, "--json", "synth", "edge-cases", "plant@1", "--dataset", "plant-edge2", "--rows", "12")
    assert again.json["content_hash"] == r.json["content_hash"]  # seeded: the same rows
    node = cli("--home", home, "--json", "lineage", "plant-edge@1").json["lineage"]
    assert node["attrs"]["synthetic"] and node["attrs"]["generator"] == "edge-cases"


def test_bad_synth_input_is_one_line_and_lands_nothing(tables_home, cli, tmp_path):
    def datasets():
        return [d["name"] for d in cli("--home", tables_home, "--json", "vault", "datasets").json["datasets"]]

    before = datasets()
    r = cli("--home", tables_home, "synth", "edge-cases", "tables@1", "--table", "equipment", "--dataset", "tables")
    assert r.code == 2 and "dataset tables holds ingested data" in r.err
    bad_tpl = write(tmp_path / "bad.toml", '[[qa]]\nquestion = "Who owns {asset}?"\nanswer = "{owner} does."\n')
    r = cli("--home", tables_home, "synth", "tables", "tables@1", "--table", "equipment", "--template", bad_tpl,
            "--dataset", "x")
    assert r.code == 2 and "{asset}, not a column" in r.err and "asset_id" in r.err and r.err.count("\n") == 1
    r = cli("--home", tables_home, "synth", "tables", "tables@1", "--template", write(tmp_path / "q.toml", QA),
            "--dataset", "x")
    assert r.code == 2 and "has 3 tables" in r.err and "equipment" in r.err
    r = cli("--home", tables_home, "synth", "tables", "handbook@1", "--template", tmp_path / "q.toml", "--dataset", "x")
    assert r.code == 2 and "handbook@1 has no tables" in r.err
    r = cli("--home", tables_home, "synth", "edge-cases", "tables@1", "--table", "nope", "--dataset", "x")
    assert r.code == 2 and "no table 'nope'" in r.err
    r = cli("--home", tables_home, "synth", "tables", "tables@1", "--table", "equipment", "--template",
            tmp_path / "q.toml", "--dataset", "x", "--policy", write(tmp_path / "p.toml", 'forbidden = ["x"]\n'))
    assert r.code == 2 and "unknown key(s) forbidden" in r.err
    everything = write(tmp_path / "all.toml", 'banned = ["rack", "risk"]\n')
    r = cli("--home", tables_home, "--json", "synth", "tables", "tables@1", "--table", "equipment", "--template",
            tmp_path / "q.toml", "--dataset", "x", "--policy", everything)
    assert r.code == 2 and "nothing to land: all" in r.json["error"] and "by the policy)" in r.json["error"]
    assert datasets() == before
    with open_vault(tables_home, read_only=True) as v:
        assert v.con.execute("SELECT count(*) FROM versions WHERE status <> 'committed'").fetchone()[0] == 0


def test_grounding_is_the_share_of_answer_words_in_the_passage():
    from appliance.vault.synth import grounding

    passage = "The tarn valve isolates the secondary coolant circuit; the Mechanical crew checks it every 30 days."
    assert grounding("It isolates the secondary coolant circuit.", passage) == 1.0
    assert grounding("The tarn valve feeds the canteen.", passage) == 0.5  # tarn, valve in; feeds, canteen not
    assert grounding("the the the", passage) == 0.0  # no content words: not grounded


def test_a_local_model_writes_pairs_about_the_documents_and_ungrounded_ones_are_dropped(train_home, cli):
    """The whole path with a real (tiny, so weak) model: passages from the vault, two completions per passage,
    the grounding filter, duplicates, landing with the model in lineage. A model this small repeats itself,
    so its answers are never grounded: at the default threshold nothing lands, and with the filter off the
    repeats collapse to one pair."""
    assert cli("--home", train_home, "train", "run", "tiny-dense", "--train.max_steps", "4", "--train.warmup_steps",
               "1", "--train.checkpoint_every", "100").code == 0
    args = ["handbook@1", "--model", "tiny-dense@1", "--passages", "12", "--max-tokens", "8"]
    r = cli("--home", train_home, "--json", "synth", "documents", *args, "--dataset", "hb-qa")
    assert r.code == 2 and "nothing to land: all 12 generated row(s) were dropped (12 ungrounded)" in r.json["error"]
    assert "hb-qa" not in [d["name"] for d in cli("--home", train_home, "--json", "vault", "datasets").json["datasets"]]
    r = cli("--home", train_home, "--json", "synth", "documents", *args, "--dataset", "hb-qa", "--min-grounding", "0")
    assert r.code == 0, r.err
    d = r.json
    assert d["generator"] == "documents" and d["generated"] == 12 and d["records"] + d["dropped"]["duplicate"] == 12
    with open_vault(train_home, read_only=True) as v:
        got = v.con.execute(f"SELECT instruction, response, source_record FROM {d['table']}").fetchall()
    assert len(got) == d["records"] and all(q and a for q, a, _ in got)
    node = cli("--home", train_home, "--json", "lineage", "hb-qa@1").json["lineage"]
    assert node["attrs"]["synthetic"] and node["attrs"]["generator"] == "documents"
    assert {(p["id"], p["role"]) for p in node["parents"]} == {("handbook@1", "source"), ("tiny-dense@1", "generator")}
