"""What every PII detector returns, and the date shapes several of them share."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finding:
    type: str
    start: int
    end: int
    value: str
    detector: str = ""  # the rule that found it: "email", "name-run", "name-role", "address", ...
    score: float = 1.0  # confidence, 0..1: 1.0 for validated shapes, lower for name evidence


MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
MONTH_NAME = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*"  # no full stop: one ends a sentence
MONTH_UP = r"(?:JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)"
YYYYMMDD = r"(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"  # "19450312", as HL7 and exports write a date
DATE = (rf"(?:\d{{4}}[-./]\d{{1,2}}[-./]\d{{1,2}}|\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}"
        rf"|{MONTH} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}"
        rf"|\d{{1,2}}(?:st|nd|rd|th)? (?:of )?{MONTH},? \d{{4}}"
        rf"|\d{{1,2}}-{MONTH}-\d{{2,4}}(?![\w-])"  # "5-Mar-2024", as clinical systems print it
        rf"|{YYYYMMDD}(?!\d)"
        rf"|\d{{1,2}}{MONTH_UP}\d{{2}}(?:\d{{2}})?(?![\w-])"  # "12MAR45", "03MAR2024", as military forms do
        rf"|{MONTH_NAME} \d{{1,2}}(?:st|nd|rd|th)?(?![\w,/:-]|, \d|\.\d)"  # no year: "March 7th", "Mar 7" (after the
        rf"|\d{{1,2}}(?:st|nd|rd|th)? (?:of )?{MONTH_NAME}(?![\w,]| \d))")  # full forms, which take the year)


def trie_pattern(words: Iterable[str]) -> str:
    """One regular expression for many literal words, their common prefixes factored out ("ad(?:mi|ult)").

    Python's engine tries the branches of an alternation one after another at every position; as a trie it
    follows one branch per letter, which makes a scan for a hundred keywords several times faster."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(node[ch]) for ch in sorted(k for k in node if k)]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return (f"(?:{body})?" if len(alts) == 1 and len(body) > 1 else f"{body}?") if "" in node else body

    return build(trie)
