"""The lineage catalog: every dataset version, tokenizer, run, model, eval and bundle is a node with parents."""

from __future__ import annotations

import json

from appliance.db_time import iso, utcnow
from appliance.errors import VaultError


def add_node(con, node_id: str, kind: str, parents: list[tuple[str, str]] | None = None,
             content_hash: str | None = None, attrs: dict | None = None) -> None:
    """Record `node_id`; `parents` are (parent id, role) pairs. Ids are never reused."""
    if con.execute("SELECT 1 FROM lineage_nodes WHERE id = ?", [node_id]).fetchone():
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
    row = con.execute(
        "SELECT id, kind, created, content_hash, attrs FROM lineage_nodes WHERE id = ?", [node_id]
    ).fetchone()
    if row is None:
        raise VaultError(f"no lineage node {node_id}", "list ids with `appliance vault datasets`")
    return {"id": row[0], "kind": row[1], "created": iso(row[2]), "content_hash": row[3],
            "attrs": json.loads(row[4] or "{}")}


def alias(con, ref: str) -> str | None:
    """The local id of what was imported from a bundle under `ref`, its id at the sender (the newest import).

    An import renames (`hosp-sft-merged@1:q4_k_m` arrives as `hosp-sft-merged.q4_k_m@1`); the sender's id
    stays an alias here, unless a local node has that id itself."""
    if con.execute("SELECT 1 FROM lineage_nodes WHERE id = ?", [ref]).fetchone():
        return None
    row = con.execute("SELECT id FROM lineage_nodes WHERE json_extract_string(attrs, '$.imported_from') = ? "
                      "ORDER BY created DESC, id DESC LIMIT 1", [ref]).fetchone()
    return row[0] if row else None


def resolve(con, ref: str) -> str:
    """A node id as given, a sender's id of an imported artifact (`alias`), or a bare dataset name -> its
    newest version."""
    if local := alias(con, ref):
        return local
    if "@" in ref or con.execute("SELECT 1 FROM lineage_nodes WHERE id = ?", [ref]).fetchone():
        return ref
    from appliance.vault.versions import resolve as resolve_version

    _, name, n = resolve_version(con, ref)
    return f"{name}@{n}"


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
