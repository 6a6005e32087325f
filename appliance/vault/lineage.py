"""The lineage catalog: every dataset version, tokenizer, run, model, eval and bundle is a node with parents.

This module holds every query of `lineage_nodes` and `lineage_edges`; the rest of the appliance asks it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from appliance.db_time import iso, utcnow
from appliance.errors import VaultError


def add_node(con, node_id: str, kind: str, parents: list[tuple[str, str]] | None = None,
             content_hash: str | None = None, attrs: dict | None = None) -> None:
    """Record `node_id`; `parents` are (parent id, role) pairs. Ids are never reused."""
    if exists(con, node_id):
        raise VaultError(f"lineage id {node_id} already exists", "ids are never reused")
    con.execute(
        "INSERT INTO lineage_nodes VALUES (?, ?, ?, ?, ?)",
        [node_id, kind, utcnow(), content_hash, json.dumps(attrs or {}, default=str)],
    )
    for parent, role in parents or []:
        con.execute("INSERT INTO lineage_edges VALUES (?, ?, ?)", [node_id, parent, role])


def next_id(con, name: str) -> str:
    """The next free `NAME@K` across every kind, counting ids reserved by unfinished training runs too."""
    ids = [r[0] for r in con.execute("SELECT id FROM lineage_nodes WHERE starts_with(id, ?) UNION ALL "
                                     "SELECT id FROM train_runs WHERE starts_with(id, ?)",
                                     [name + "@", name + "@"]).fetchall()]
    numbers = [int(i.rsplit("@", 1)[1]) for i in ids if i.rsplit("@", 1)[1].isdigit()]
    return f"{name}@{max(numbers, default=0) + 1}"


def node(con, node_id: str) -> dict:
    """The node `node_id` (id, kind, created, content_hash, attrs); VaultError if there is none."""
    found = find(con, node_id)
    if found is None:
        raise VaultError(f"no lineage node {node_id}", "list ids with `appliance vault datasets`")
    return found


def find(con, node_id: str) -> dict | None:
    """The node `node_id` as `node` gives it, or None."""
    row = con.execute(
        "SELECT id, kind, created, content_hash, attrs FROM lineage_nodes WHERE id = ?", [node_id]
    ).fetchone()
    if row is None:
        return None
    return {"id": row[0], "kind": row[1], "created": iso(row[2]), "content_hash": row[3],
            "attrs": json.loads(row[4] or "{}")}


def exists(con, node_id: str) -> bool:
    return con.execute("SELECT 1 FROM lineage_nodes WHERE id = ?", [node_id]).fetchone() is not None


def kind_of(con, node_id: str) -> str | None:
    """The kind of node `node_id` (dataset, tokenizer, model, adapter, gguf, eval, ...), or None."""
    row = con.execute("SELECT kind FROM lineage_nodes WHERE id = ?", [node_id]).fetchone()
    return row[0] if row else None


def nodes(con, kinds: tuple[str, ...], newest_first: bool = False) -> list[dict]:
    """Every node of `kinds`, oldest (or newest) first: id, kind, created (as stored, a timestamp), attrs."""
    marks = ",".join("?" * len(kinds))
    rows = con.execute(f"SELECT id, kind, created, attrs FROM lineage_nodes WHERE kind IN ({marks}) "
                       f"ORDER BY created{' DESC' if newest_first else ''}, id", list(kinds)).fetchall()
    return [{"id": i, "kind": k, "created": t, "attrs": json.loads(a or "{}")} for i, k, t, a in rows]


def count(con, kinds: tuple[str, ...]) -> int:
    """How many nodes of `kinds` there are."""
    marks = ",".join("?" * len(kinds))
    return con.execute(f"SELECT count(*) FROM lineage_nodes WHERE kind IN ({marks})", list(kinds)).fetchone()[0]


def newest(con, name: str, kinds: tuple[str, ...]) -> str | None:
    """The `NAME@K` of one of `kinds` with the highest K, or None."""
    marks = ",".join("?" * len(kinds))
    ids = [i for (i,) in con.execute(f"SELECT id FROM lineage_nodes WHERE kind IN ({marks}) AND starts_with(id, ?)",
                                     [*kinds, name + "@"]).fetchall() if i.rsplit("@", 1)[1].isdigit()]
    return max(ids, key=lambda i: int(i.rsplit("@", 1)[1])) if ids else None


def ids_named(con, name: str, kinds: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(id, kind) of every node `NAME@...` (of `kinds`, or of any kind), by id."""
    where, params = "starts_with(id, ?)", [name + "@"]
    if kinds is not None:
        where += f" AND kind IN ({','.join('?' * len(kinds))})"
        params += list(kinds)
    return [(i, k) for i, k in con.execute(f"SELECT id, kind FROM lineage_nodes WHERE {where} ORDER BY id",
                                           params).fetchall()]


def name_used(con, name: str) -> bool:
    """Whether any node has an id `NAME@...`."""
    return con.execute("SELECT 1 FROM lineage_nodes WHERE starts_with(id, ?) LIMIT 1", [name + "@"]).fetchone() \
        is not None


def parents(con, node_id: str) -> list[tuple[str, str]]:
    """(parent id, role) of `node_id`, by parent id."""
    return [(p, r) for p, r in con.execute(
        "SELECT parent, role FROM lineage_edges WHERE child = ? ORDER BY parent", [node_id]).fetchall()]


# Which parents lead to what a model learned from: its data first, then what it was adapted or built from.
# What a sender's id may look like to be kept as an alias: a whole versioned id, `NAME@K` or `NAME@K:TYPE`.
# A bare name never is: it would shadow this site's own newest NAME@K (names are the sender's choice).
SENDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}@[0-9]{1,9}(:[a-z0-9_-]{1,32})?")


SENDERS_INDEX = ".senders.json"  # in artifacts/gguf/: sender's id -> imported GGUF, for vault-less lookups


def sender_id(value) -> str | None:
    """The sender's id from a bundle's (signed, but sender-written) lineage, if it is a whole versioned id."""
    return value if isinstance(value, str) and SENDER_ID.fullmatch(value) else None


_ROLE_ORDER = ("CASE e.role WHEN 'data' THEN 0 WHEN 'adapter' THEN 1 WHEN 'base' THEN 2 ELSE 3 END, e.parent")


def ancestors(con, node_id: str) -> Iterator[tuple[str, str, str]]:
    """(id, kind, role) of every ancestor of `node_id`, nearest first (breadth first; a model's data before
    its adapter before its base at each step), each once."""
    frontier, seen = [node_id], {node_id}
    while frontier:
        nxt = []
        for child in frontier:
            for parent, kind, role in con.execute(
                    "SELECT e.parent, n.kind, e.role FROM lineage_edges e JOIN lineage_nodes n ON n.id = e.parent "
                    "WHERE e.child = ? ORDER BY " + _ROLE_ORDER, [child]).fetchall():
                if parent not in seen:
                    seen.add(parent)
                    nxt.append(parent)
                    yield parent, kind, role
        frontier = nxt


def nearest_dataset(con, node_id: str) -> str | None:
    """The nearest dataset version in `node_id`'s ancestry (what a model was trained or fine-tuned on), or None."""
    return next((a for a, kind, _ in ancestors(con, node_id) if kind == "dataset"), None)


def alias(con, ref: str) -> str | None:
    """The local id of what was imported from a bundle under `ref`, its id at the sender (the newest import).

    An import renames (`hosp-sft-merged@1:q4_k_m` arrives as `hosp-sft-merged.q4_k_m@1`); the sender's id
    stays an alias here, unless it is not a whole `NAME@K[:TYPE]`, or this site has made its own NAME@K."""
    if sender_id(ref) is None or exists(con, ref):
        return None
    name = ref.split("@", 1)[0]
    if con.execute("SELECT 1 FROM lineage_nodes WHERE starts_with(id, ?) AND json_extract_string(attrs, "
                   "'$.imported_from') IS NULL LIMIT 1", [name + "@"]).fetchone():
        return None  # this site has its own NAME@K: a sender's id never stands in for them
    row = con.execute("SELECT id FROM lineage_nodes WHERE json_extract_string(attrs, '$.imported_from') = ? "
                      "ORDER BY created DESC, id DESC LIMIT 1", [ref]).fetchone()
    return row[0] if row else None


def descendants(con, node_id: str, _seen: frozenset[str] = frozenset()) -> list[dict]:
    """What was made from `node_id` (runs, models, GGUFs, evals, bundles), nested under `children`."""
    out = []
    for child, role, kind in con.execute(
        "SELECT e.child, e.role, n.kind FROM lineage_edges e JOIN lineage_nodes n ON n.id = e.child "
        "WHERE e.parent = ? ORDER BY n.created, e.child", [node_id]
    ).fetchall():
        if child not in _seen:
            out.append({"id": child, "kind": kind, "role": role,
                        "children": descendants(con, child, _seen | {node_id})})
    return out


def tree(con, node_id: str, _seen: frozenset[str] = frozenset()) -> dict:
    """`node_id` with its ancestors nested under `parents` (a DAG shown as a tree; cycles cut)."""
    out = node(con, node_id)
    out["parents"] = []
    for parent, role in con.execute(
        "SELECT parent, role FROM lineage_edges WHERE child = ? ORDER BY parent", [node_id]
    ).fetchall():
        if parent in _seen:
            continue
        sub = tree(con, parent, _seen | {node_id})
        sub["role"] = role
        out["parents"].append(sub)
    out["children"] = [c for (c,) in con.execute(
        "SELECT child FROM lineage_edges WHERE parent = ? ORDER BY child", [node_id]).fetchall()]
    return out


def render(t: dict, indent: str = "") -> list[str]:
    role = f" [{t['role']}]" if t.get("role") else ""
    h = f"  {t['content_hash'][:12]}" if t.get("content_hash") else ""
    lines = [f"{indent}{t['id']} ({t['kind']}){role}{h}"]
    lines += imported(t, indent + ("│   " if t["parents"] else "    "))
    for i, p in enumerate(t["parents"]):
        last = i == len(t["parents"]) - 1
        sub = render(p, indent + ("    " if last else "│   "))
        sub[0] = indent + ("└── " if last else "├── ") + sub[0][len(indent) + 4:]
        lines += sub
    return lines


def imported(t: dict, pad: str) -> list[str]:
    """For a node that arrived in a bundle: the bundle, its signer, the sender's id and the sender's lineage."""
    attrs = t.get("attrs") or {}
    b = attrs.get("bundle")
    if not b:
        return []
    lines = [f"{pad}imported from bundle {b.get('name')} v{b.get('version')}, signed by {b.get('signer')} "
             f"({b.get('key_id')}), manifest sha256 {str(b.get('manifest_sha256'))[:16]}",
             f"{pad}sender's id: {attrs.get('imported_from')} (accepted here as an alias of {t['id']})"]
    if src := attrs.get("source_lineage"):
        lines.append(f"{pad}sender's lineage:")
        lines += render(src, pad + "  ")
    return lines


# --- re-scrubbed datasets ------------------------------------------------------------------------
RESCRUB = "rescrub"  # the role of the edge from a re-scrubbed version to the version it re-scrubbed


def rescrubbed_as(con, dataset_id: str) -> list[str]:
    """The versions made by re-scrubbing `dataset_id` under a stricter policy (`vault ingest --rescrub`)."""
    return [c for (c,) in con.execute("SELECT child FROM lineage_edges WHERE parent = ? AND role = ? ORDER BY child",
                                      [dataset_id, RESCRUB]).fetchall()]


def less_scrubbed(con, node_id: str) -> list[dict]:
    """Datasets in `node_id`'s making (itself included) that were re-scrubbed since under a stricter policy:
    what was made from them learned from less-scrubbed data. Each: dataset, rescrubbed_as, made (for the
    dataset itself: what was made from it) and a message. Empty when there is nothing to warn about."""
    kind = kind_of(con, node_id)
    if kind is None:
        return []
    out = []
    for ds, k in [(node_id, kind), *_unscrubbed_ancestors(con, node_id)]:
        later = rescrubbed_as(con, ds) if k == "dataset" else []
        if not later:
            continue
        ids = ", ".join(later)
        if ds == node_id:
            made = _made(descendants(con, ds))
            msg = (f"{ds} was re-scrubbed under a stricter policy as {ids}"
                   + (f"; made from it, on less-scrubbed data: {', '.join(made[:10])}"
                      + (f" and {len(made) - 10} more" if len(made) > 10 else "") if made else ""))
        else:
            made = []
            again = (f"re-scrub it too (`appliance vault ingest --rescrub {node_id}`)" if kind == "dataset"
                     else f"make it again from {later[-1]}")
            msg = (f"{node_id} was made from {ds}, which was re-scrubbed under a stricter policy as {ids}: it "
                   f"holds less-scrubbed data; {again}")
        out.append({"dataset": ds, "rescrubbed_as": later, "made": made, "message": msg})
    return out


def _unscrubbed_ancestors(con, node_id: str) -> Iterator[tuple[str, str]]:
    """(id, kind) of `node_id`'s ancestors, not past a re-scrub: what a re-scrubbed version came from was
    scrubbed again in it."""
    frontier, seen = [node_id], {node_id}
    while frontier:
        nxt = []
        for child in frontier:
            for parent, kind in con.execute(
                    "SELECT e.parent, n.kind FROM lineage_edges e JOIN lineage_nodes n ON n.id = e.parent "
                    "WHERE e.child = ? AND e.role <> ? ORDER BY e.parent", [child, RESCRUB]).fetchall():
                if parent not in seen:
                    seen.add(parent)
                    nxt.append(parent)
                    yield parent, kind
        frontier = nxt


def _made(tree: list[dict]) -> list[str]:
    """Ids in a `descendants` tree that are not dataset versions, each once, in order."""
    out: list[str] = []
    for c in tree:
        if c["role"] == RESCRUB:  # the re-scrubbed version, and what was made from it, are not the warning's
            continue
        if c["kind"] != "dataset" and c["id"] not in out:
            out.append(c["id"])
        out += [i for i in _made(c["children"]) if i not in out]
    return out
