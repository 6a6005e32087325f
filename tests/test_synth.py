"""`appliance synth`: template Q&A over real rows, edge cases, PII scrubbing, the site policy, lineage."""

from __future__ import annotations

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
    with open_vault(tables_home, read_only=True) as v:
        critical = v.con.execute("SELECT count(*) FROM data.t1_equipment WHERE risk_class = 'critical'").fetchone()[0]
        rows = v.con.execute(f"SELECT instruction, response FROM {d['table']}").fetchall()
    assert d["version"] == "eq-qa@1" and d["generated"] == 2 * 240 and d["dropped"] == {"policy": critical}
    assert d["records"] == len(rows) == 480 - critical and d["pii"] == {"EMAIL": 240 - critical}
    assert all(a.endswith("(Synthetic; check the register.)") for _, a in rows)
    assert not any("critical" in q + a for q, a in rows)
    assert not any("@halvorsen-dyn.example" in q + a for q, a in rows)  # scrubbed before it landed
    where = ("Where is Corvid array unit 1?", "Corvid array unit 1 is in rack A. (Synthetic; check the register.)")
    assert where in rows
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
    lines = ["site,mode,temp"] + [f"{s},{m},{t}" for s, m, t in
                                  [("A", "auto", 20), ("A", "manual", 22), ("B", "auto", 25), ("B", "manual", 21),
                                   ("C", "auto", 30), ("A", "auto", 24), ("B", "auto", 23), ("C", "auto", 26)]]
    write(src / "readings.csv", "\n".join(lines) + "\n")
    assert cli("--home", home, "vault", "ingest", src, "--dataset", "plant").code == 0
    r = cli("--home", home, "--json", "synth", "edge-cases", "plant@1", "--dataset", "plant-edge", "--rows", "12")
    assert r.code == 0, r.err
    with open_vault(home, read_only=True) as v:
        got = v.con.execute(f"SELECT site, mode, temp, edge_case FROM {r.json['table']}").fetchall()
    assert len(got) == 12 and r.json["records"] == 12
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
    assert r.code == 2 and "nothing to land: all 480 generated row(s) were dropped (480 by the policy)" in \
        r.json["error"]
    assert datasets() == before
    with open_vault(tables_home, read_only=True) as v:
        assert v.con.execute("SELECT count(*) FROM versions WHERE status <> 'committed'").fetchone()[0] == 0
