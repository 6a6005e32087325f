"""PII in HL7 v2 messages, read by their structure: the fields of a segment that hold a person's identifiers.

Hospital interfaces log HL7 v2 messages as text ("PID|1||00448812^^^HOSP^MR||OKONKWO^MARGARET^A||19450312|F|||
12 Elm St^^Springfield^IL^62704||(217)555-0134"). Its names are written "FAMILY^GIVEN^MIDDLE", in capitals and
without a title or a label, its IDs and birth dates bare: nothing the prose rules read. Each segment's fields
say what they hold (the HL7 v2.5 field tables), so the fields are read as the standard names them, one
component at a time, and the message keeps its structure when they are replaced ("[PERSON]^[PERSON]^[PERSON]").

A segment starts a line (or follows a blank or a log line's prefix: "10:12:01 PID|1||..."). Without a message
header, only a line that holds a component separator is read as one; a field's value is replaced only when it
has the shape the field says (a name of letters, an ID with a digit, a date of eight digits).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from appliance.vault.pii_base import Finding

# Field kinds: how each component of a field is read.
_XPN = "XPN"  # a person's name: family ^ given ^ middle ^ suffix ^ prefix
_XCN = "XCN"  # a person in a role: ID ^ family ^ given ^ middle ^ ...
_CX = "CX"  # an identifier: ID ^ check digit ^ ... (the ID is the person's)
_XAD = "XAD"  # an address: street ^ other ^ city ^ state ^ ZIP ^ country
_XTN = "XTN"  # a phone number, in any of its components
_DTM = "DTM"  # a date and time: YYYYMMDD[HHMM[SS]]
_ID = "ID"  # a number that is the person's (SSN, account, licence): its first component

# (segment, field number) -> (field kind, PII type). Field numbers as the standard counts them: MSH's from 1 at
# its field separator, every other segment's from 1 after its name.
FIELDS: dict[tuple[str, int], tuple[str, str]] = {
    ("PID", 2): (_CX, "MRN"), ("PID", 3): (_CX, "MRN"), ("PID", 4): (_CX, "MRN"), ("PID", 5): (_XPN, "PERSON"),
    ("PID", 6): (_XPN, "PERSON"), ("PID", 7): (_DTM, "DOB"), ("PID", 9): (_XPN, "PERSON"),
    ("PID", 11): (_XAD, "ADDRESS"), ("PID", 13): (_XTN, "PHONE"), ("PID", 14): (_XTN, "PHONE"),
    ("PID", 18): (_CX, "ACCOUNT"), ("PID", 19): (_ID, "SSN"), ("PID", 20): (_ID, "LICENSE"),
    ("PID", 21): (_CX, "MRN"), ("PID", 29): (_DTM, "DATE"),
    ("MRG", 1): (_CX, "MRN"), ("MRG", 3): (_CX, "ACCOUNT"), ("MRG", 7): (_XPN, "PERSON"),
    ("NK1", 2): (_XPN, "PERSON"), ("NK1", 4): (_XAD, "ADDRESS"), ("NK1", 5): (_XTN, "PHONE"),
    ("NK1", 6): (_XTN, "PHONE"), ("NK1", 30): (_XPN, "PERSON"), ("NK1", 31): (_XTN, "PHONE"),
    ("NK1", 32): (_XAD, "ADDRESS"), ("NK1", 37): (_ID, "SSN"),
    ("PV1", 7): (_XCN, "PERSON"), ("PV1", 8): (_XCN, "PERSON"), ("PV1", 9): (_XCN, "PERSON"),
    ("PV1", 17): (_XCN, "PERSON"), ("PV1", 19): (_CX, "ACCOUNT"), ("PV1", 44): (_DTM, "DATE"),
    ("PV1", 45): (_DTM, "DATE"), ("PV1", 52): (_XCN, "PERSON"),
    ("ORC", 10): (_XCN, "PERSON"), ("ORC", 11): (_XCN, "PERSON"), ("ORC", 12): (_XCN, "PERSON"),
    ("ORC", 14): (_XTN, "PHONE"),
    ("OBR", 16): (_XCN, "PERSON"), ("OBR", 17): (_XTN, "PHONE"), ("OBR", 28): (_XCN, "PERSON"),
    ("OBX", 16): (_XCN, "PERSON"),
    ("TXA", 5): (_XCN, "PERSON"), ("TXA", 9): (_XCN, "PERSON"), ("TXA", 10): (_XCN, "PERSON"),
    ("TXA", 22): (_XCN, "PERSON"), ("TXA", 23): (_XCN, "PERSON"),
    ("GT1", 3): (_XPN, "PERSON"), ("GT1", 5): (_XAD, "ADDRESS"), ("GT1", 6): (_XTN, "PHONE"),
    ("GT1", 7): (_XTN, "PHONE"), ("GT1", 8): (_DTM, "DOB"), ("GT1", 12): (_ID, "SSN"),
    ("IN1", 16): (_XPN, "PERSON"), ("IN1", 18): (_DTM, "DOB"), ("IN1", 19): (_XAD, "ADDRESS"),
    ("IN1", 36): (_ID, "ACCOUNT"), ("IN1", 49): (_CX, "ACCOUNT"),
    ("IN2", 2): (_ID, "SSN"),
    ("DG1", 16): (_XCN, "PERSON"), ("PR1", 11): (_XCN, "PERSON"), ("PR1", 12): (_XCN, "PERSON"),
    ("PD1", 4): (_XCN, "PERSON"), ("ROL", 4): (_XCN, "PERSON"), ("EVN", 5): (_XCN, "PERSON"),
    ("STF", 3): (_XPN, "PERSON"), ("PRD", 2): (_XPN, "PERSON"),
}
_LAST_FIELD = {seg: max(n for s, n in FIELDS if s == seg) for seg, _ in FIELDS}
_KEYS = tuple(sorted({f"{seg}|" for seg, _ in FIELDS}))  # looked for with str.find: most texts hold no "|"
# A segment where a line starts, or after a blank or a log line's prefix ("10:12:01 PID|"); not inside a
# Markdown table or a shell pipe ("|PID|USER|", "grep 'PID|'")
_SEGMENT = re.compile(r"(?:(?<=[\r\n \t])|^)(" + "|".join(sorted(_LAST_FIELD)) + r")\|", re.M)
_NAME_PARTS = {_XPN: (0, 1, 2), _XCN: (1, 2, 3)}  # the components that are a person's name words
_ADDRESS_PARTS = {0: "ADDRESS", 1: "ADDRESS", 2: "ADDRESS", 4: "ZIP"}  # not the state or the country
# The message header: its four encoding characters (component, repetition, escape, subcomponent: "^~\&")
_MSH = re.compile(r"MSH\|([^\w\s|])([^\w\s|])([^\w\s|])([^\w\s|])\|")
_DATE8 = re.compile(r"(?:1[89]|2[01])\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])")


def hl7(text: str, _low: str = "", _scan=None) -> Iterator[Finding]:
    """Findings in the HL7 v2 segments of `text`: in a text with a message header (MSH), every segment; in
    one without, the segments whose line holds a component separator ("^") as messages do and documentation
    tables, shell output and prose that name a segment do not. Fields are parted by "|", as the standard and
    every interface write them; the component separator is the header's (MSH-2), "^" without one."""
    if "|" not in text:
        return
    has_msh = "MSH|" in text
    if not has_msh and "^" not in text or not any(k in text for k in _KEYS):
        return  # a Markdown table's "|": no header and no component separator, no segment looked for
    msh = _MSH.search(text) if has_msh else None
    comp_sep = msh.group(1) if msh else "^"
    line_start, line_end, line_ok = -1, -1, False
    for m in _SEGMENT.finditer(text):
        if m.start() >= line_end:  # the segment's line, found once however many segments it holds
            line_start = max(text.rfind("\n", 0, m.start()), text.rfind("\r", 0, m.start())) + 1
            line_end = _line_end(text, m.end())
            line_ok = msh is not None or text.find(comp_sep, line_start, line_end) >= 0
        if not line_ok:
            continue
        seg = m.group(1)
        last = _LAST_FIELD[seg]
        pos, number = m.end(), 1
        while pos <= line_end and number <= last:  # up to the last field read: never the whole line per segment
            stop = text.find("|", pos, line_end)
            stop = line_end if stop < 0 else stop
            kind = FIELDS.get((seg, number))
            if kind and stop > pos:
                yield from _field(text, pos, stop, kind[0], kind[1], comp_sep)
            pos, number = stop + 1, number + 1


def _line_end(text: str, i: int) -> int:
    n = text.find("\n", i)
    r = text.find("\r", i, n if n >= 0 else len(text))
    return r if r >= 0 else n if n >= 0 else len(text)


def _field(text: str, start: int, end: int, kind: str, typ: str, comp_sep: str) -> Iterator[Finding]:
    """The findings in one field's value text[start:end], each repetition ("~") and component on its own."""
    pos = start
    while pos <= end:
        stop = text.find("~", pos, end)
        stop = end if stop < 0 else stop
        comps, c = [], pos
        while c <= stop:
            e = text.find(comp_sep, c, stop)
            e = stop if e < 0 else e
            comps.append((c, e))
            c = e + 1
        yield from _components(text, comps, kind, typ)
        pos = stop + 1


def _components(text: str, comps: list[tuple[int, int]], kind: str, typ: str) -> Iterator[Finding]:
    def found(i: int, t: str) -> Finding | None:
        if i < len(comps):
            s, e = comps[i]
            value = text[s:e].strip()
            if value and value != '""':
                s += len(text[s:e]) - len(text[s:e].lstrip())
                return Finding(t, s, s + len(value), value, "hl7")
        return None

    if kind in _NAME_PARTS:
        picks = [(i, "PERSON") for i in _NAME_PARTS[kind]]
        if kind == _XCN:
            picks.append((0, "LICENSE"))  # the provider's own number (NPI, staff ID)
    elif kind == _XAD:
        picks = list(_ADDRESS_PARTS.items())
    elif kind == _XTN:
        picks = [(i, "PHONE") for i in range(len(comps))
                 if sum(ch.isdigit() for ch in text[comps[i][0]:comps[i][1]]) >= 3]
    else:  # _CX, _ID, _DTM: the first component
        picks = [(0, typ)]
    for i, t in picks:
        f = found(i, t)
        if f is not None and _looks(f.value, t, kind):
            yield f


def _looks(value: str, typ: str, kind: str) -> bool:
    """Whether a component's value has the shape its field says: a name holds letters and no digit, an ID a
    digit, a date eight digits of a real date; what does not (a documentation table's words) is left alone."""
    if typ == "PERSON":
        return any(c.isalpha() for c in value) and not any(c.isdigit() for c in value)
    if kind == _DTM:
        return _DATE8.match(value) is not None
    if typ == "ADDRESS":  # a street or a city
        return any(c.isalpha() for c in value)
    return any(c.isdigit() for c in value)
