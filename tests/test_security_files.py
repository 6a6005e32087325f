"""Links in the ingest tree and planted links at the names the appliance writes (security items 3 and 7).

Every test goes through the real command; each failed on the code before the fix: ingest read through nested
links, and export wrote plaintext through a link planted at its predictable `.NAME.partial-PID` name.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

SECRET = "BEGIN-OPENSSH-PRIVATE-KEY-zq7x-do-not-leak"
OUTSIDE_NOTE = "The outside note about the pump overhaul schedule."


def _secret_dir(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "id_ed25519.txt").write_text(SECRET + "\n")
    (d / "secrets.csv").write_text(f"name,value\nkey,{SECRET}\n")
    (d / "note.md").write_text(OUTSIDE_NOTE + "\n")
    return d


def _keyring_values(home: Path) -> list[str]:
    """Long string values of HOME/keyring.json (salt, wrapped keys, vault id): none may land in a record."""
    out: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and len(x) >= 16:
            out.append(x)

    walk(json.loads((home / "keyring.json").read_text()))
    assert out
    return out


def _inbox(tmp_path: Path, home: Path, outside: Path) -> Path:
    inbox = tmp_path / "inbox"
    (inbox / "sub" / "deeper").mkdir(parents=True)
    (inbox / "notes.md").write_text("Maintenance notes for the north pump station.\n")
    (inbox / "sub" / "deeper" / "id.txt").symlink_to(outside / "id_ed25519.txt")
    (inbox / "sub" / "keyring.md").symlink_to(home / "keyring.json")
    (inbox / "sub" / "table.csv").symlink_to(outside / "secrets.csv")
    (inbox / "sub" / "elsewhere").symlink_to(outside, target_is_directory=True)
    repo = inbox / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "src" / "main.py").write_text("print('pump')\n")
    (repo / "src" / "leak.py").symlink_to(outside / "id_ed25519.txt")
    return inbox


def _export(cli, home: Path, ref: str, out: Path) -> str:
    r = cli("--home", home, "vault", "export", ref, "--out", out)
    assert r.code == 0, r.err
    return out.read_text()


def test_ingest_skips_nested_links_and_reports_them(home, cli, tmp_path):
    outside = _secret_dir(tmp_path)
    inbox = _inbox(tmp_path, home, outside)
    r = cli("--home", home, "--json", "vault", "ingest", inbox, "--dataset", "inbox")
    assert r.code == 0, r.err
    skipped = {os.path.relpath(s["path"], inbox): s["reason"] for s in r.json["skipped"]}
    links = {"sub/deeper/id.txt", "sub/keyring.md", "sub/table.csv", "sub/elsewhere", "repo/src/leak.py"}
    assert links <= set(skipped)
    assert all("symbolic link (not followed" in skipped[p] for p in links)
    assert r.json["tables"] == [] and r.json["files"] == 2  # notes.md and repo/src/main.py

    text = _export(cli, home, "inbox@1", tmp_path / "export.jsonl")
    assert "north pump station" in text and "print('pump')" in text
    assert SECRET not in text and OUTSIDE_NOTE not in text
    assert not any(v in text for v in _keyring_values(home))
    shown = cli("--home", home, "--json", "vault", "show", "inbox@1").json
    link_rows = [s for s in shown["sources"] if os.path.relpath(s["path"], inbox) in links]
    assert len(link_rows) == len(links) and {s["status"] for s in link_rows} == {"skipped"}


def test_follow_links_follows_outside_but_never_into_the_home(home, cli, tmp_path):
    outside = _secret_dir(tmp_path)
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "sub" / "note.md").symlink_to(outside / "note.md")
    (inbox / "sub" / "keyring.md").symlink_to(home / "keyring.json")
    (inbox / "sub" / "home").symlink_to(home, target_is_directory=True)
    (inbox / "sub" / "up").symlink_to(inbox, target_is_directory=True)  # a loop: walked once
    r = cli("--home", home, "--json", "vault", "ingest", inbox, "--dataset", "followed", "--follow-links")
    assert r.code == 0, r.err
    skipped = {os.path.relpath(s["path"], inbox): s["reason"] for s in r.json["skipped"]}
    assert "into the appliance home" in skipped["sub/keyring.md"]
    assert "into the appliance home" in skipped["sub/home"]
    assert r.json["files"] == 1
    text = _export(cli, home, "followed@1", tmp_path / "export.jsonl")
    assert OUTSIDE_NOTE in text
    assert not any(v in text for v in _keyring_values(home))
    # a path inside the home named outright is refused too
    r = cli("--home", home, "--json", "vault", "ingest", home / "keyring.json", "--dataset", "ring")
    assert r.code == 1 and "inside the appliance home" in r.err


def test_link_swapped_in_after_the_walk_is_not_opened(home, cli, tmp_path, monkeypatch):
    """The race: the walk lists real files, then links take their places before they are opened.

    Through the worker processes too (the pool is forced on), and for a table (DuckDB opens by name)."""
    import appliance.vault.ingest as ing

    outside = _secret_dir(tmp_path)
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "a.md").write_text("A harmless note about valves.\n")
    (inbox / "b.csv").write_text("name,value\npump,3\n")
    (inbox / "sub" / "c.md").write_text("Another harmless note.\n")
    (inbox / "z.md").write_text("The note that stays.\n")
    (outside / "c.md").write_text(SECRET + "\n")  # same name as the file in sub/ it will stand in for
    real_plan = ing.plan

    def plan_then_swap(*args, **kwargs):
        items = list(real_plan(*args, **kwargs))
        (inbox / "a.md").unlink()
        (inbox / "a.md").symlink_to(outside / "id_ed25519.txt")
        (inbox / "b.csv").unlink()
        (inbox / "b.csv").symlink_to(outside / "secrets.csv")
        (inbox / "sub").rename(tmp_path / "sub-moved")
        (inbox / "sub").symlink_to(outside, target_is_directory=True)  # a directory above a file, swapped
        return iter(items)

    monkeypatch.setattr(ing, "plan", plan_then_swap)
    monkeypatch.setattr(ing, "POOL_MIN_BYTES", 0)
    r = cli("--home", home, "--json", "vault", "ingest", inbox, "--dataset", "raced", "--workers", "2")
    assert r.code == 3, r.err  # partial: the swapped files are reported as failed
    failed = {os.path.relpath(f["path"], inbox): f["reason"] for f in r.json["failed"]}
    assert set(failed) == {"a.md", "b.csv", "sub/c.md"}
    assert "symbolic link" in failed["a.md"] and "symbolic link" in failed["b.csv"]
    assert "changed since it was listed" in failed["sub/c.md"]
    text = _export(cli, home, "raced@1", tmp_path / "export.jsonl")
    assert "The note that stays." in text and SECRET not in text


def _plant(shared: Path, name: str) -> Path:
    victim = shared.parent / f"victim-{name}"
    victim.write_text("attacker's file\n")
    (shared / name).symlink_to(victim)
    return victim


def _ingest_small(cli, home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "n.md").write_text("Plaintext that must not reach an attacker's file.\n")
    assert cli("--home", home, "vault", "ingest", src, "--dataset", "d").code == 0


def test_export_goes_around_a_link_planted_at_its_partial_name(home, cli, tmp_path):
    _ingest_small(cli, home, tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    victim = _plant(shared, f".out.jsonl.partial-{os.getpid()}")  # the name the export used to write to
    old_umask = os.umask(0)
    try:
        text = _export(cli, home, "d@1", shared / "out.jsonl")
    finally:
        os.umask(old_umask)
    assert "Plaintext" in text
    assert victim.read_text() == "attacker's file\n"
    st = os.lstat(shared / "out.jsonl")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert sorted(p.name for p in shared.iterdir()) == sorted([".out.jsonl.partial-" + str(os.getpid()),
                                                               "out.jsonl"])  # no temp file left


def test_export_refuses_a_link_at_its_final_name(home, cli, tmp_path):
    _ingest_small(cli, home, tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = _plant(shared, "out.jsonl")
    r = cli("--home", home, "vault", "export", "d@1", "--out", shared / "out.jsonl", "--force")
    assert r.code != 0 and "symbolic link" in r.err
    dangling = shared / "gone.jsonl"
    dangling.symlink_to(shared / "nowhere")  # a dangling link does not "exist", but is refused as well
    r = cli("--home", home, "vault", "export", "d@1", "--out", dangling)
    assert r.code != 0 and "symbolic link" in r.err
    assert victim.read_text() == "attacker's file\n" and not (shared / "nowhere").exists()
    assert (shared / "out.jsonl").is_symlink() and dangling.is_symlink()
    assert sorted(p.name for p in shared.iterdir()) == ["gone.jsonl", "out.jsonl"]


def test_public_key_export_goes_around_a_planted_temp_name(home, cli, tmp_path, monkeypatch):
    """`keys export-public --out` (home.atomic_write, used by every --out that writes a small file)."""
    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key pass 1234")
    assert cli("--home", home, "keys", "generate", "--name", "site-a").code == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = _plant(shared, f".pub.json.tmp-{os.getpid()}")  # atomic_write's former temp name
    r = cli("--home", home, "keys", "export-public", "site-a", "--out", shared / "pub.json")
    assert r.code == 0, r.err
    assert victim.read_text() == "attacker's file\n"
    assert json.loads((shared / "pub.json").read_text())["key_id"]
    assert not (shared / "pub.json").is_symlink()


def test_trust_store_entries_are_0600_whatever_the_umask(home, cli, tmp_path, monkeypatch):
    """The library (as the MCP server and the console call it) does not rely on the CLI's umask."""
    from appliance import api
    from tests.conftest import open_vault

    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key pass 1234")
    assert cli("--home", home, "keys", "generate", "--name", "site-a").code == 0
    pub = tmp_path / "pub.json"
    assert cli("--home", home, "keys", "export-public", "site-a", "--out", pub).code == 0
    old_umask = os.umask(0o022)
    try:
        with open_vault(home) as v:
            api.trust_add(v, pub, "hq", ["gguf"])
    finally:
        os.umask(old_umask)
    entries = list(home.rglob("hq.json"))
    assert entries and all(stat.S_IMODE(os.lstat(p).st_mode) == 0o600 for p in entries)
