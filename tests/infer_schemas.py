"""Draft the --json schemas from real outputs: run the suite recording them, then infer, then review.

    APPLIANCE_RECORD_JSON=/tmp/rec.jsonl pytest -q      # every cli(..., "--json") output, one per line
    python tests/infer_schemas.py /tmp/rec.jsonl        # writes appliance/schemas/COMMAND.json

A key is required when every recorded output had it; a value may be null when any had null; nesting past
MAX_DEPTH is left open. The files are the contract afterwards: review the diff before committing.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

MAX_DEPTH = 3
ROOT = Path(__file__).resolve().parents[1]


def kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def infer(values: list, depth: int = 0) -> dict:
    kinds = {kind(v) for v in values}
    if kinds == {"null"}:
        return {}
    if {"integer", "number"} <= kinds:
        kinds.discard("integer")
    out: dict = {"type": sorted(kinds)[0] if len(kinds) == 1 else sorted(kinds)}
    if depth >= MAX_DEPTH:
        return out
    objs = [v for v in values if isinstance(v, dict)]
    if objs:
        keys = sorted({k for o in objs for k in o})
        out["properties"] = {k: infer([o[k] for o in objs if k in o], depth + 1) for k in keys}
        required = [k for k in keys if all(k in o for o in objs)]
        if required:
            out["required"] = required
    items = [x for v in values if isinstance(v, list) for x in v]
    if items:
        out["items"] = infer(items, depth + 1)
    return out


def main(record: str) -> None:
    from appliance.cli import cli
    from appliance.schemas import JSON_SCHEMA_VERSION, file_of

    seen: dict[str, list] = defaultdict(list)
    for line in Path(record).read_text().splitlines():
        row = json.loads(line)
        if row["cmd"] and row["out"].get("ok", True) is not False:
            seen[row["cmd"]].append(row["out"])
    for command, outs in sorted(seen.items()):
        body = infer([{k: v for k, v in o.items() if k not in ("ok", "schema")} for o in outs])
        node = cli
        for word in command.split():
            node = node.commands[word]
        doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"appliance {command} --json",
               "description": (node.help or "").strip().splitlines()[0], "type": "object",
               "required": ["ok", "schema", *body.get("required", [])],
               "properties": {"ok": {"const": True}, "schema": {"const": JSON_SCHEMA_VERSION},
                              **body.get("properties", {})}}
        file_of(command).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"{command}: {len(outs)} outputs")


if __name__ == "__main__":
    main(sys.argv[1])
