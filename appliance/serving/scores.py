"""The site's suite metrics on what was served: the eval suites' own scoring, applied to recorded answers.

A recorded answer is scored where it applies:

- its question (the last user message of a chat, or a completion's prompt) is a case of a suite, the same
  text (case and spacing aside) asked the same way (a `chat = true` case by chat, others as completions): it
  is scored by that case's expectation (`appliance.eval.metrics.score`, as `eval run` scores it; `choice`
  cases need the model's likelihoods and are left out), under `accuracy:SUITE`;
- the request carried a reference answer (`metadata.reference`, with `metadata.expect`: contains, the
  default, exact or regex): it is scored against it, under `accuracy:reference`.

The custom metrics a suite names (`[[metric]] type = "custom"`) are computed by the eval metric registry's
own functions on the answers scored under that suite, under `NAME:SUITE`. Metrics that need the model itself
(perplexity, vocabulary coverage, tasks) do not apply to served text; latency is measured by `ab` already.
Nothing here imports more than the standard library at module level: the vault-less server imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REFERENCE_EXPECTS = ("contains", "exact", "regex")
REFERENCE = "accuracy:reference"


def suites(names: Sequence[str] | None = None) -> list:
    """The suites to score with: those named (names or TOML files), else every shipped suite; only suites
    with cases apply."""
    from appliance import refs
    from appliance.eval import suite as S
    from appliance.eval.metrics import load_plugins

    load_plugins()  # custom metrics of the site (APPLIANCE_EVAL_PLUGINS), as `eval run` loads them
    chosen = list(names) if names is not None else list(refs.shipped(refs.SUITES_DIR))
    return [s for s in (S.load(n) for n in chosen) if s.cases]


def _norm(text: str) -> str:
    return " ".join((text or "").split()).casefold()


def question(messages: list[dict]) -> tuple[dict, bool] | None:
    """The message that asked (the last user message, or a completion's prompt) and whether it was a chat."""
    from appliance.serving.store import ASKED

    asked = [m for m in messages if m.get("role") in ASKED]
    return (asked[-1], asked[-1].get("role") == "user") if asked else None


def scored(rows: list[dict], chosen: list) -> dict[str, list[dict]]:
    """Metric key -> the scored answers of `rows` (answered records), each a case result as `eval run`
    keeps one: case, passed, output, tokens, total_ms."""
    from appliance.eval.metrics import score
    from appliance.eval.suite import Case

    cases: dict[tuple[str, bool], list] = {}
    for s in chosen:
        for c in s.cases:
            if c.expect != "choice":
                cases.setdefault((_norm(c.prompt), c.chat), []).append((f"accuracy:{s.name}", c))
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] != "ok" or (q := question(r["messages"])) is None:
            continue
        msg, chat = q
        hits = list(cases.get((_norm(msg.get("content") or ""), chat), ()))  # counted in each suite that asks it
        if msg.get("reference"):
            hits.append((REFERENCE, Case("reference", msg.get("content") or "", msg.get("expect") or "contains",
                                         msg["reference"], chat=chat)))
        for key, case in hits:
            try:
                passed = score(case, r["answer"])
            except Exception:  # noqa: BLE001 - a reference regex scrubbing broke, a schema that cannot apply
                continue
            out.setdefault(key, []).append({"case": case.id, "passed": bool(passed), "output": r["answer"],
                                            "tokens": r["completion_tokens"] or 0, "total_ms": r["latency_ms"],
                                            "ttft_ms": None, "record": r["id"]})
    return out


def measures(chosen: list) -> dict[str, tuple[str, Callable[[list[dict]], float]]]:
    """Suite-wide metric key -> (the accuracy key whose answers it reads, fn(cases) -> value): each custom
    metric of each suite, from the eval metric registry."""
    from appliance.eval.metrics import REGISTRY

    return {f"{m.key}:{s.name}": (f"accuracy:{s.name}", REGISTRY[m.name])
            for s in chosen for m in s.metrics if m.type == "custom"}
