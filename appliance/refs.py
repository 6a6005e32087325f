"""References: what a person, a job or an agent types for a thing, resolved to the id or file it names.

Every command, job, API function and agent tool resolves here, so one reference means one thing everywhere
and one mistake gets one error.

Things in the vault (dataset versions, tokenizers, models, adapters, GGUFs, eval runs), one rule:

- `NAME@K` names that version. It must exist and be of a kind the caller takes.
- `NAME` names the newest `NAME@K` of those kinds (the highest K); a GGUF's `NAME:TYPE` the newest
  `NAME@K:TYPE`.
- An imported artifact also answers to the id it had at the site that sent it (`lineage.alias`).
- A miss is a `UsageError` (exit 2): `no KIND REF`, with a hint naming what exists (the versions of that
  name, else the newest of that kind) and the command that lists them; a thing of another kind is
  `REF is a KIND, not a WANTED`.

Dataset versions keep the rule in `vault.versions.resolve`, below this module, because the vault's own
readers need it too; `dataset` here is its face for everything above the vault, with the same error.

Shipped files (eval suites, tasks, training recipes): a path to a TOML file (ending in `.toml`, or a path that
exists) or a shipped name; an agent may name shipped ones only (`shipped_only`). A suite may also be a dataset
version `NAME@N`: that version's default suite.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import NotFound, UsageError
from appliance.vault import lineage, versions

_ROOT = Path(__file__).parent
SUITES_DIR = _ROOT / "eval" / "suites"  # shipped eval suites, by file stem
TASKS_DIR = _ROOT / "tasks" / "shipped"  # shipped agentic tasks (also runnable as suites)
RECIPES_DIR = _ROOT / "train" / "recipes"  # shipped training recipes

# A dataset version as a suite (its default suite): NAME@N, NAME as a dataset is named.
DATASET_REF = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}@\d+$")


@dataclass(frozen=True)
class Kind:
    label: str  # in messages: "no LABEL REF"
    plural: str
    listing: str  # where to see them (or make another), after the ones named
    make: str  # how to make one, for an empty vault


KINDS = {
    "dataset": Kind("dataset version", "datasets", "list them with `appliance vault datasets`",
                    "ingest one with `appliance vault ingest`"),
    "tokenizer": Kind("tokenizer", "tokenizers", "train another with `appliance train tokenizer --dataset NAME`",
                      "train one with `appliance train tokenizer --dataset NAME`"),
    "model": Kind("model", "models", "list them with `appliance train models`", "train one with `appliance train run`"),
    "adapter": Kind("LoRA adapter", "adapters", "list them with `appliance train models`",
                    "train one with a LoRA recipe (`appliance train recipes`)"),
    "gguf": Kind("GGUF", "GGUFs", "list them with `appliance quantize --list`",
                 "export one with `appliance quantize MODEL`"),
    "eval": Kind("eval run", "eval runs", "list them with `appliance eval runs`", "run one with `appliance eval run`"),
    "sweep": Kind("sweep", "sweeps", "list them with `appliance jobs list --all`",
                  "queue one with `appliance jobs sweep`"),
}


# --- the rule, on a list of ids ---------------------------------------------------------------------------
def pick(ref: str, ids: Iterable[str]) -> str | None:
    """The rule over the ids that exist: `ref` itself if it is one; a bare `NAME` (a GGUF's `NAME:TYPE`) ->
    the `NAME@K` (`NAME@K:TYPE`) with the highest K; else None. For listings without a vault (a home's
    artifact folders), and under `node`."""
    ids = list(ids)
    if ref in ids:
        return ref
    if "@" in ref:
        return None
    name, _, qtype = ref.partition(":")
    best: tuple[int, str] | None = None
    for i in ids:
        n, _, rest = i.rpartition("@")
        k, _, t = rest.partition(":")
        if n == name and k.isdigit() and t == qtype and (best is None or int(k) > best[0]):
            best = (int(k), i)
    return best[1] if best else None


def name_of(ref: str) -> str:
    """The NAME of `NAME`, `NAME@K` or `NAME@K:TYPE` (or `NAME:TYPE`)."""
    return ref.rpartition("@")[0] if "@" in ref else ref.partition(":")[0]


# --- things in the vault ----------------------------------------------------------------------------------
def node(con, ref: str, kinds: tuple[str, ...] | None = None, what: str | None = None) -> str:
    """The lineage id `ref` names among `kinds` (any kind when None), by the rule above; `what` is how a
    miss names what was wanted (default: the first kind's label, "lineage node" for any kind)."""
    what = what or (KINDS[kinds[0]].label if kinds and kinds[0] in KINDS else "lineage node")
    if not isinstance(ref, str) or not ref.strip():
        raise UsageError(f"no {what} given", "name one by its id, NAME@K (or NAME for the newest)")
    local = lineage.alias(con, ref) or ref  # the sender's id of an imported artifact
    kind = lineage.kind_of(con, local)
    if kind is not None and (kinds is None or kind in kinds):
        return local
    named = lineage.ids_named(con, name_of(ref))
    if kind is None and "@" not in ref:
        wanted = [i for i, k in named if kinds is None or k in kinds]
        if found := pick(ref, wanted):
            return found
        if other := pick(ref, [i for i, _ in named]):  # NAME is only of another kind
            local, kind = other, dict(named)[other]
    if kind is not None:
        raise _wrong_kind(local, kind, what)
    if kinds is None or "dataset" in kinds:
        if any(k == "dataset" for _, k in named) or kinds == ("dataset",):
            return dataset(con, ref)  # the dataset rule, and its error
    raise _missing(con, ref, kinds, what, named)


def dataset(con, ref: str) -> str:
    """The committed dataset version `NAME@N` that `ref` (`NAME@N`, or `NAME` for the newest) names."""
    if not isinstance(ref, str) or not ref.strip():
        raise UsageError("no dataset version given", "name one as NAME@N (or NAME for the newest)")
    _, name, n = versions.resolve(con, ref)
    return f"{name}@{n}"


def model(con, ref: str, gguf: bool = False) -> str:
    """The model id `ref` names (a trained, merged or imported model); with `gguf`, a GGUF id as well."""
    return node(con, ref, ("model", "gguf") if gguf else ("model",), "model")


def gguf(con, ref: str) -> str:
    """The GGUF id `ref` names: `NAME@K:TYPE`, `NAME:TYPE` (the newest), or an imported GGUF's local id or the
    id it had at the site that sent it."""
    return node(con, ref, ("gguf",), "GGUF")


def adapter(con, ref: str) -> str:
    return node(con, ref, ("adapter",), "adapter")


def tokenizer(con, ref: str) -> str:
    return node(con, ref, ("tokenizer",), "tokenizer")


def _missing(con, ref: str, kinds: tuple[str, ...] | None, what: str,
             named: list[tuple[str, str]]) -> UsageError:
    """`no WHAT REF`, and what exists: the versions of REF's name, else the newest of the kind wanted."""
    key = "gguf" if ":" in ref and (kinds is None or "gguf" in kinds) else (kinds[0] if kinds else "")
    what = KINDS["gguf"].label if key == "gguf" else what  # NAME@K:TYPE is a GGUF's id, whoever asks
    if named:  # a version of a name that exists: said as the kind that name is, whichever command was given it
        taken = [(i, k) for i, k in named if kinds is None or k in kinds]
        same = [(i, k) for i, k in taken if k == key] or taken or named
        same.sort(key=lambda ik: (_number(ik[0]), ik[0]))
        ids, last = [i for i, _ in same], same[-1][1]
        if last in KINDS and (kinds is None or last in kinds):
            what = KINDS[last].label
        more = "..., " if len(ids) > 6 else ""
        listing = f"; {KINDS[last].listing}" if last in KINDS else ""
        return NotFound(f"no {what} {ref}", f"{name_of(ref)} has {more}{', '.join(ids[-6:])}{listing}")
    if key not in KINDS:
        return NotFound(f"no {what} {ref}", "list ids with `appliance vault datasets`, `appliance train models`, "
                                              "`appliance quantize --list` or `appliance eval runs`")
    kind = KINDS[key]
    newest = [n["id"] for n in lineage.nodes(con, (key,), newest_first=True)[:6]]
    if not newest:
        return NotFound(f"no {what} {ref}", f"there are no {kind.plural} here yet; {kind.make}")
    more = ", ..." if len(newest) > 5 else ""
    return NotFound(f"no {what} {ref}",
                      f"{kind.plural} here: {', '.join(newest[:5])}{more}; {kind.listing}")


def _number(node_id: str) -> int:
    """K of `NAME@K` or `NAME@K:TYPE` (0 when there is none), to order versions as numbers."""
    k = node_id.rpartition("@")[2].partition(":")[0]
    return int(k) if k.isdigit() else 0


def _wrong_kind(node_id: str, kind: str, what: str) -> UsageError:
    label = KINDS[kind].label if kind in KINDS else kind
    if kind == "adapter":
        return UsageError(f"{node_id} is a LoRA adapter, not a {what}",
                          f"merge it first: `appliance train merge {node_id}`")
    return UsageError(f"{node_id} is {_a(label)}, not {_a(what)}", f"name {_a(what)} instead")


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


# --- shipped files ----------------------------------------------------------------------------------------
def _file(ref: str, what: str, shipped: dict[str, Path], shipped_only: bool, listed: str) -> Path:
    """A TOML file by path, or a shipped one by name; an agent (`shipped_only`) by name only. `listed` says
    what is shipped, for the error."""
    if shipped_only:
        if isinstance(ref, str) and ref in shipped:
            return shipped[ref].resolve()
        raise UsageError(f"no shipped {what} named {ref!r}", f"use one of {listed}")
    if not isinstance(ref, str) or not ref.strip():
        raise UsageError(f"no {what} given", f"pass a TOML file or a shipped {what}: {listed}")
    p = Path(ref).expanduser()
    if p.suffix == ".toml" or "/" in ref or p.is_file():
        if not p.is_file():
            raise UsageError(f"no {what} file {ref}", f"pass a TOML file or a shipped {what}: {listed}")
        return p
    if ref in shipped:
        return shipped[ref]
    raise UsageError(f"no {what} named {ref!r}", f"shipped {what}s: {listed}; or pass a TOML file")


def shipped(folder: Path) -> dict[str, Path]:
    """The TOML files of a shipped folder, by name (file stem), sorted."""
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def suite_file(ref: str, shipped_only: bool = False) -> Path:
    """The file of a suite: a TOML path, a shipped suite by name, or a shipped task (run as a suite)."""
    suites, tasks = shipped(SUITES_DIR), shipped(TASKS_DIR)
    listed = (f"{', '.join(suites)}; tasks: {', '.join(tasks)}; or DATASET@N (a dataset version's default suite)")
    return _file(ref, "suite", {**tasks, **suites}, shipped_only, listed)  # a suite wins over a task of its name


def is_dataset_suite(ref: str) -> bool:
    """Whether a suite reference names a dataset version's default suite (`NAME@N`) rather than a file."""
    return isinstance(ref, str) and DATASET_REF.match(ref) is not None


def suite(ref: str, con=None, shipped_only: bool = False) -> str:
    """A suite reference made exact: `NAME@N` (checked against the vault when `con` is given) for a dataset
    version's default suite, or the path of the suite's file (`suite_file`)."""
    if is_dataset_suite(ref):
        return dataset(con, ref) if con is not None else ref
    return str(suite_file(ref, shipped_only))


def task(ref: str | Path, shipped_only: bool = False) -> Path:
    """The file of an agentic task: a TOML path or a shipped task by name."""
    tasks = shipped(TASKS_DIR)
    return _file(str(ref), "task", tasks, shipped_only, ", ".join(tasks))


def recipe(ref: str, shipped_only: bool = False) -> Path:
    """The file of a training recipe: a TOML path or a shipped recipe by name."""
    recipes = shipped(RECIPES_DIR)
    return _file(ref, "recipe", recipes, shipped_only, ", ".join(recipes) + " (see `appliance train recipes`)")
