"""Scoring: one function per case expectation, dataset-level metrics, and custom metrics by name.

A custom metric is a plain function of the run's case results, registered by name:

    from appliance.eval.metrics import register

    @register("mean_output_words")
    def mean_output_words(cases: list[dict]) -> float:
        return sum(len(c["output"].split()) for c in cases) / max(1, len(cases))

Suites name it with `[[metric]] type = "custom", name = "mean_output_words"`; modules that register
metrics are imported from APPLIANCE_EVAL_PLUGINS (comma-separated module names).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable

from appliance.plugins import Registry

REGISTRY = Registry("eval metric", "APPLIANCE_EVAL_PLUGINS")  # name -> fn(cases) -> float
# direction of "better" for gates and comparisons
HIGHER_IS_BETTER = {"accuracy": True, "task_completion": True, "perplexity": False, "vocab_coverage": True,
                    "tokens_per_s": True, "latency_p50_ms": False, "latency_p95_ms": False, "ttft_p50_ms": False,
                    "ttft_p95_ms": False}


def register(name: str):
    """`@register("name")`: a custom metric, fn(cases) -> float."""
    return REGISTRY.register(name)


def load_plugins() -> None:
    """Import the modules named in APPLIANCE_EVAL_PLUGINS (appliance.plugins: one line if one fails)."""
    REGISTRY.load()


@register("mean_output_words")
def mean_output_words(cases: list[dict]) -> float:
    """Average words per answer: a cheap signal of answers getting longer or shorter between versions."""
    return sum(len(c["output"].split()) for c in cases) / max(1, len(cases))


def score(case, output: str) -> bool:
    """Does `output` meet the case's expectation? (choice cases are scored by log-likelihood instead)."""
    out = output.strip()
    if case.expect == "exact":
        return out == case.answer.strip()
    if case.expect == "contains":
        return case.answer.lower() in out.lower()
    if case.expect == "regex":
        return re.search(case.answer, out) is not None
    if case.expect in ("json", "json_schema"):
        try:
            value = json.loads(out)
        except ValueError:
            return False
        if case.expect == "json":
            return True
        from jsonschema import Draft202012Validator

        return Draft202012Validator(case.schema).is_valid(value)
    raise ValueError(case.expect)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency(cases: list[dict]) -> dict:
    timed = [c for c in cases if c.get("total_ms") is not None]
    tokens = sum(c["tokens"] for c in timed)
    secs = sum(c["total_ms"] for c in timed) / 1000
    return {"latency_p50_ms": percentile([c["total_ms"] for c in timed], 0.5),
            "latency_p95_ms": percentile([c["total_ms"] for c in timed], 0.95),
            "ttft_p50_ms": percentile([c["ttft_ms"] for c in timed], 0.5),
            "ttft_p95_ms": percentile([c["ttft_ms"] for c in timed], 0.95),
            "tokens_per_s": tokens / secs if secs else float("nan")}


_WORD = re.compile(r"\b[A-Za-z][A-Za-z0-9-]{3,}\b")
_COMMON = set("""this that with from have will your they them their there what when where which while would
could should about after before other these those into than then also been were more most some such only
over under each every must shall does done made make many much very just like used uses using here""".split())


def domain_terms(texts: list[str], top: int = 200) -> list[str]:
    """The site's own vocabulary: frequent words of its data that are not common English function words."""
    counts = Counter(w for t in texts for w in _WORD.findall(t) if w.lower() not in _COMMON)
    return [w for w, n in counts.most_common(top) if n >= 2]


def vocab_coverage(tokenize: Callable[[str], list[int]], terms: list[str]) -> dict:
    """Share of terms the tokenizer keeps in at most 2 pieces (with a leading space, as in running text)."""
    pieces = [len(tokenize(" " + t)) for t in terms]
    if not pieces:
        return {"vocab_coverage": float("nan"), "tokens_per_term": float("nan"), "terms": 0}
    return {"vocab_coverage": sum(p <= 2 for p in pieces) / len(pieces),
            "tokens_per_term": sum(pieces) / len(pieces), "terms": len(pieces)}
