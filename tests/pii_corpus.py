"""A labeled corpus of realistic documents for the PII scan: clinical notes, incident reports, maintenance logs
and mail, with every identifier's span and type known, and hard negatives (look-alike words: "Will", "May",
job titles, places, equipment named after people, numbers that are not identifiers) whose spans must stay.

Two splits that share nothing but the generators of values:
  - `dev`: the templates and the name slice the detection rules were tuned on;
  - `eval`: held-out templates (other wording, other documents) and names drawn from a disjoint slice of the
    name lists (every fourth name by rank), plus invented names that are in no list at all.
`benchmarks/pii_recall.py` reports the `eval` split; tests use both.

    python tests/pii_corpus.py [dev|eval]     prints a few documents with their labels
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.vault.pii_names import ranked_lists  # noqa: E402
from tests import pii_labeled as pl  # noqa: E402


@dataclass
class Doc:
    text: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (type, start, end)
    negatives: list[tuple[str, int, int]] = field(default_factory=list)  # (category, start, end)
    domain: str = ""


# --- names ---------------------------------------------------------------------------------------
_SYL_A = ["ad", "ob", "nwa", "ch", "ol", "ik", "em", "ugo", "ta", "sol", "vey", "dra", "kwa", "mbe", "zan", "rhy"]
_SYL_B = ["aeze", "ino", "ua", "eka", "umide", "aro", "enna", "ilu", "oya", "ashi", "ume", "onte", "ira", "anwo"]
_PARTICLES = ["de", "van", "van der", "von", "da", "del", "Al-", "El-", "O'", "Mac", "ter"]


class Names:
    """Given names and surnames for one split: listed ones from a slice of the lists, and invented ones."""

    def __init__(self, split: str, rng: random.Random):
        lists = ranked_lists()
        held = split == "eval"
        self.first = [n.capitalize() for i, n in enumerate(lists["first"]) if (i % 4 == 3) == held]
        self.last = [n.capitalize() for i, n in enumerate(lists["last"][:40000]) if (i % 4 == 3) == held]
        self.rng = rng

    def _invented(self) -> str:
        r = self.rng
        return (r.choice(_SYL_A) + r.choice(_SYL_B)).capitalize()

    def person(self) -> tuple[str, str]:
        r = self.rng
        first = self._invented() if r.random() < 0.12 else r.choice(self.first[: 1200 if r.random() < 0.7 else None])
        roll = r.random()
        if roll < 0.15:
            last = self._invented()
        elif roll < 0.23:
            p = r.choice(_PARTICLES)
            base = r.choice(self.last[:8000]) if r.random() < 0.5 else self._invented()
            last = f"{p}{base}" if p.endswith(("-", "'")) or p == "Mac" else f"{p} {base}"
        elif roll < 0.28:
            last = f"{r.choice(self.last[:5000])}-{r.choice(self.last[:5000])}"
        else:
            last = r.choice(self.last[: 3000 if r.random() < 0.6 else None])
        return first, last


def render(first: str, last: str, form: str, rng: random.Random) -> str:
    mid = f" {rng.choice('ABCDEFGHJKLMNPRSTW')}."
    return {
        "full": f"{first} {last}", "middle": f"{first}{mid} {last}", "initial": f"{first[0]}. {last}",
        "lastfirst": f"{last}, {first}", "last": last, "upper": f"{first} {last}".upper(),
        "lower": f"{first} {last}".lower(), "first": first,
    }[form]


# --- values of the other types ---------------------------------------------------------------------
_STREETS = ["Birchwood", "Maple", "Hillcrest", "Lakeview", "Cedar", "Harbor", "Willow", "Summit", "Ridge", "Orchard",
            "Elm", "Franklin", "Kingsley", "Meadow", "Juniper", "Chestnut", "Riverside", "Highland", "Quarry", "Ash"]
_SUFFIXES = ["Street", "St", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Court", "Boulevard", "Way", "Place"]
_CITIES = [("Springfield", "IL"), ("Riverton", "WY"), ("Fairview", "OR"), ("Salem", "MA"), ("Dayton", "OH"),
           ("Madison", "WI"), ("Georgetown", "TX"), ("Franklin", "TN"), ("Clinton", "IA"), ("Greenville", "SC")]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _zip(r):
    return f"{r.randint(10000, 99899):05d}" + (f"-{r.randint(1000, 9999)}" if r.random() < 0.2 else "")


def address(r):
    s = f"{r.randint(1, 9899)} {r.choice(_STREETS)} {r.choice(_SUFFIXES)}"
    if r.random() < 0.3:
        s += f", {r.choice(['Apt', 'Suite', 'Unit'])} {r.randint(1, 40)}{r.choice(['', 'B', 'C'])}"
    if r.random() < 0.6:
        city, st = r.choice(_CITIES)
        s += f", {city}, {st} {_zip(r)}"
    return s


def date(r):
    y, m, d = r.randint(2015, 2026), r.randint(1, 12), r.randint(1, 28)
    return r.choice([f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}", f"{m}/{d}/{y}", f"{_MONTHS[m - 1]} {d}, {y}",
                     f"{d} {_MONTHS[m - 1]} {y}"])


def age(r):
    return str(r.randint(90, 104))


def account(r):
    return r.choice([f"{r.choice('ABCHJKMWXYZ')}{r.choice('ABCHJKMWXYZ')}{r.randint(1000000, 99999999)}",
                     f"{r.randint(100000000, 999999999)}", f"MBR-{r.randint(100000, 9999999)}",
                     f"{r.randint(1000, 9999)}-{r.randint(100000, 999999)}"])


def license_(r):
    return r.choice([f"{r.choice('ABDFGKMRS')}{r.randint(1000000, 9999999)}", f"RN{r.randint(100000, 999999)}",
                     f"{r.choice('ABFM')}{r.choice('ABCDEFGHJ')}{r.randint(1000000, 9999999)}",
                     f"{r.randint(1000000000, 1999999999)}", f"D{r.randint(100, 999)}-{r.randint(1000, 9999)}"])


def vin(r):
    chars = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
    from appliance.vault.pii_safe_harbor import vin_ok
    while True:
        body = "".join(r.choice(chars) for _ in range(17))
        for check in "0123456789X":
            v = body[:8] + check + body[9:]
            if vin_ok(v) and any(c.isalpha() for c in v) and any(c.isdigit() for c in v):
                return v


def _letters(r, n: int, alphabet: str = "ABCDEFGHJKLMNPRSTVWXYZ") -> str:
    return "".join(r.choice(alphabet) for _ in range(n))


def plate(r):
    return r.choice([f"{r.randint(1, 9)}{_letters(r, 3)}{r.randint(100, 999)}",
                     f"{_letters(r, 3)}-{r.randint(1000, 9999)}"])


def serial(r):
    return r.choice([f"SN{r.randint(100000, 9999999)}", f"{_letters(r, 1, 'ABCKMXZ')}{r.randint(10, 99)}-"
                     f"{r.randint(10000, 99999)}", f"{r.randint(10000000, 99999999)}",
                     f"{_letters(r, 2, 'ABCKMXZ')}{r.randint(1000000, 9999999)}"])


def url(r):
    host = r.choice(["portal.example-health.org", "intranet.example.com", "www.example.org", "records.example.net"])
    path = r.choice(["", "/patients/" + str(r.randint(1000, 99999)), "/u/" + r.choice(["okafor", "jsmith", "a.berg"]),
                     "/ticket?id=" + str(r.randint(100, 9999))])
    return r.choice(["https://", "http://", ""]) + host + path if not host.startswith("www.") else host + path


def dodid(r):
    return str(r.randint(1000000000, 1999999999))


def fax(r):
    return pl.phone(r)


VALUES = {
    "EMAIL": pl.email, "PHONE": pl.phone, "SSN": pl.ssn, "CARD": pl.card, "IBAN": pl.iban, "IPV4": pl.ipv4,
    "IPV6": pl.ipv6, "DOB": pl.dob, "MRN": pl.mrn, "PASSPORT": pl.passport, "ADDRESS": address, "DATE": date,
    "AGE": age, "FAX": fax, "ACCOUNT": account, "LICENSE": license_, "VIN": vin, "PLATE": plate,
    "DEVICE": serial, "URL": url, "DODID": dodid, "ZIP": _zip,
}
TYPE_OF = {"VIN": "VEHICLE", "PLATE": "VEHICLE"}

# --- hard negatives: words and numbers that look like identifiers but are not ------------------------
NEGATIVES = {
    "job title": ["Endoscopy Nurse Manager", "Senior Biomedical Engineer", "Charge Nurse", "Shift Supervisor",
                  "Chief Medical Officer", "Nurse Practitioner", "Clinical Nurse Specialist", "Duty Manager",
                  "Lead Maintenance Technician", "Infection Prevention Lead", "Ward Sister", "Medical Director",
                  "Senior Staff Nurse", "Operations Manager", "Quality Lead", "Radiology Services Manager"],
    "word name": ["Will", "May", "Hope", "Mark", "Bill", "Grant", "Rose", "Faith", "Grace", "Chase", "Frank",
                  "Joy", "Dawn", "Drew", "Sterling", "Hunter", "Summer", "Iris", "Ray", "Guy"],
    "month": ["April", "May", "June", "August", "March", "January"],
    "place": ["Boston", "Oslo", "Houston", "Phoenix", "Charlotte", "Madison", "Lincoln", "Jackson", "Victoria",
              "Florence", "Austin", "Denver", "Bergen", "Georgia", "Washington"],
    "eponym": ["Foley catheter", "Doppler", "Allen key", "Phillips screwdriver", "Geiger counter", "Bunsen burner",
               "Petri dish", "Swan-Ganz catheter", "Kelly clamp", "Mayo stand", "Venturi mask", "Yankauer sucker",
               "Luer lock", "Stryker saw", "Glasgow Coma Scale", "Apgar score", "Heimlich manoeuvre"],
    "organisation": ["Johns Hopkins Hospital", "Mayo Clinic", "Mercy Health", "Grace Hospital", "St Mary's Hospital",
                     "Halvorsen Dynamics", "Kingsley Medical Center", "Parkland Trust", "Baxter pumps"],
    "heading": ["Grace Period Policy", "Hope Ward Rota", "Mark Sheet", "Bill Payment Run", "Rose Garden Unit",
                "Faith Community Centre", "Frank Discussion Notes", "Dawn Patrol Checklist", "Grant Application Review",
                "Sterling Silver Tray", "Hunter Valley Depot", "Major Incident Plan", "King Street Campus",
                "Young Adult Unit", "Long Covid Clinic", "White Cell Count", "Brown Bin Collection", "Green Team Audit",
                "Baker Street Annex", "Victoria Line Closure", "Jackson Memorial Hospital", "Parkinson Nurse Service"],
    "number": ["version 4.2.1", "order 55120934", "part no. 4411-2200", "ward 7", "bed 12", "room 101",
               "90 mg", "98.6 F", "in 2019", "age 45", "aged 67", "75-year-old", "24 hours", "Q3 2024",
               "build 20240115", "ticket 55512345", "batch 2231-B", "lot 77812", "rev 3", "ISO 13485"],
}


def _neg(r: random.Random, cat: str) -> str:
    return r.choice(NEGATIVES[cat])


# --- templates -----------------------------------------------------------------------------------
# {T} an identifier of type T; {P:form} a person (form: full, middle, initial, lastfirst, last, upper,
# lower, first); {N:category} a hard negative. Everything else is literal.
DEV = [
    ("clinical", "Patient {P:full} (MRN: {MRN}, DOB: {DOB}) was seen on the ward by Dr. {P:last}. {N:word name} "
                 "the {N:eponym} be needed? Admitted on {DATE}; the {N:job title} was informed."),
    ("clinical", "Ward round {N:month} notes. Pt {P:full}, {AGE}-year-old, lives at {ADDRESS}. Seen with "
                 "Nurse {P:last}. Plan: repeat {N:eponym} check, {N:number}."),
    ("clinical", "Discharge summary for {P:middle}. Discharged on {DATE}. Health plan member ID: {ACCOUNT}. "
                 "Follow up with {P:initial} at the {N:organisation} in {N:place}."),
    ("clinical", "patient {P:lower} seen in clinic, {N:number}. contact phone {PHONE}. {N:word name} return "
                 "in six weeks."),
    ("clinical", "PATIENT: {P:upper}\nDOB: {DOB}\nSSN: {SSN}\nREFERRED BY: DR. {P:upper}"),
    ("incident", "Needle-stick incident. Source patient {P:full}; injured staff member {P:full} ({N:job title}). "
                 "Reported by {P:initial} on {DATE}. Witness: {P:lastfirst}."),
    ("incident", "Incident report: Sgt. {P:last} and Capt. {P:full} attended. Vehicle VIN {VIN}, plate "
                 "{PLATE}. DoD ID {DODID}. The {N:job title} reviewed it in {N:month}."),
    ("incident", "Fall on the stairs. {P:full}'s daughter called from {PHONE}. {N:word name} the "
                 "{N:organisation} take the report? Fax: {FAX}."),
    ("maintenance", "Infusion pump serial number {DEVICE} replaced by {N:job title} {P:full}. {N:number}; "
                    "{N:eponym} tested. Log: {URL}."),
    ("maintenance", "Work order for the {N:place} site. Technician {P:last} swapped the board (S/N {DEVICE}). "
                    "Engineer licence no. {LICENSE}. Signed: {P:full}"),
    ("maintenance", "Asset check {N:number}: {N:eponym} OK, {N:eponym} OK. Operator {P:full} ({EMAIL}) from "
                    "{IPV4}. {N:word name} fix next week. Depot ZIP code {ZIP}."),
    ("mail", "From: {P:full} <{EMAIL}>\nSubject: {N:job title} rota\n\nHi {P:first},\n\nCan you cover {N:month}? "
             "Card {CARD} for the course.\n\nBest regards,\n{P:full}"),
    ("mail", "Dear {P:full},\n\nPlease wire the fee to {IBAN}. My passport number {PASSPORT}. The "
             "{N:organisation} portal is at {URL}.\n\nThanks,\n{P:first}"),
    ("mail", "Reply to {EMAIL}. {P:full} and {P:full} will join. Address: {ADDRESS}. Server {IPV6} is down. "
             "{N:word name} that be a problem?"),
]
# More of the ways notes name people, and headings made of name-like words (written for tuning; dev only).
DEV += [
    ("clinical", "{N:heading}\nSeen and examined with {P:full}, RN, and {P:full}, MD. {P:full} called the ward at "
                 "noon about the {N:eponym}; {N:word name} review tomorrow."),
    ("clinical", "Present: {P:full}; {P:full}; {P:initial}; {P:lastfirst}. Apologies: {P:full}.\n{N:heading}: "
                 "{N:number}."),
    ("incident", "| Name | Role | Phone |\n| --- | --- | --- |\n| {P:full} | {N:job title} | {PHONE} |\n"
                 "| {P:full} | {N:job title} | {PHONE} |"),
    ("incident", "Per {P:last}, the {N:eponym} failed twice. Thanks to {P:first} and {P:full} for the quick fix. "
                 "Logged under {N:heading}."),
    ("maintenance", "NAME: {P:upper}   S/N: {DEVICE}\nTask: {N:heading}. Done with {P:full} ({N:job title})."),
    ("incident", "Reviewed by {P:full}. {N:word name} and {N:word name} agreed; {N:word name} the team confirm? "
                 "Options: {N:word name}, {N:word name} or {N:month}."),
    ("mail", "Thanks {P:first}. {N:word name} the {N:job title} call {P:full} back? {N:word name} and "
             "{N:word name} are on leave in {N:month}.\n\nRegards,\n{P:full}"),
    ("mail", "cc: {P:full}, {P:full}\n\n{P:first}, could you and {P:full} look at the {N:heading} draft? "
             "{N:word name} it go out in {N:month}?\n\n-- \n{P:full}\n{N:job title}, {N:organisation}"),
]

EVAL = [
    ("clinical", "HISTORY: {P:full} is a {AGE} y/o admitted {DATE} via the {N:organisation}. Date of birth "
                 "{DOB}; medical record number {MRN}. Attending: Dr. {P:full}. {N:word name} be reviewed by the "
                 "{N:job title}."),
    ("clinical", "Progress note, {N:month}. Seen by {P:initial} with the {N:job title}. The patient, "
                 "{P:full}, aged {AGE}, home address {ADDRESS}. {N:eponym} in place; {N:number}."),
    ("clinical", "Operative note. Surgeon: {P:lastfirst}. Assistant: {P:middle}. Procedure date {DATE}. "
                 "Implant serial {DEVICE}. Insurance policy number {ACCOUNT}. {N:eponym} used."),
    ("clinical", "nursing handover: mrs {P:lower} settled overnight, {N:number}. family phone {PHONE}. "
                 "{N:word name} review in the morning."),
    ("clinical", "Death certificate. Deceased: {P:full}. Date of death: {DATE}. Certifying physician "
                 "{P:full}, license number {LICENSE}. {N:place} registry."),
    ("incident", "Security incident at {N:organisation}: {P:full} ({EMAIL}) reported {IPV4} scanning. "
                 "Escalated to {P:initial}, {N:job title}. Account number {ACCOUNT} was locked. {N:number}."),
    ("incident", "Road traffic collision, {N:place}. Driver {P:full}, licence plate {PLATE}, VIN {VIN}. "
                 "Passenger {P:full}, {AGE} years old. Officer {P:last} attended. {N:word name} follow up."),
    ("incident", "Personnel record: SSgt {P:full}, EDIPI {DODID}, SSN {SSN}. Next of kin {P:full}, "
                 "{PHONE}. Deployed {N:month}; {N:number}."),
    ("maintenance", "PM record {N:number}. Device ID {DEVICE} (ventilator) calibrated by {P:full}, "
                    "{N:job title}. {N:eponym} replaced. Next due {N:month}."),
    ("maintenance", "Field service: engineer {P:full} visited {ADDRESS}. Unit serial {DEVICE}; "
                    "firmware {N:number}. Report at {URL}. {N:word name} order the {N:eponym}."),
    ("maintenance", "Shift log. {P:full} on duty, with {P:full} and {P:initial}. Gateway {IPV6} restarted; "
                    "{N:organisation} notified. {N:eponym} check done."),
    ("mail", "To: {P:full} <{EMAIL}>\nCc: {EMAIL}\nSubject: {N:month} invoices\n\nHello {P:first},\n\nThe "
             "refund goes to IBAN {IBAN}; card {CARD} was charged twice. Please fax {FAX}.\n\nKind regards,\n"
             "{P:full}\n{N:job title}"),
    ("mail", "Hi all,\n\n{P:full} from the {N:organisation} asked for the files; send them to {EMAIL} or "
             "post to {ADDRESS} (postal code {ZIP} for the depot). Passport: {PASSPORT}. {N:word name} you "
             "confirm?\n\nCheers,\n{P:first}"),
    ("mail", "Thanks {P:first}. I spoke with {P:full} and {P:lastfirst}; the portal is {URL}. "
             "{N:word name} the {N:job title} sign off? Phone {PHONE}."),
]

# A closing sentence with more look-alikes, one per document, so that negatives outnumber identifiers.
DEV_CODA = [
    "{N:word name} the {N:eponym} be ready by {N:month}? The {N:job title} at {N:organisation} says {N:number}.",
    "Note from the {N:job title}: {N:eponym} and {N:eponym} checked in {N:place}, {N:number}, {N:number}.",
    "{N:month} audit: {N:organisation} asked the {N:job title} about {N:number}. {N:word name} do.",
]
EVAL_CODA = [
    "Addendum ({N:month}): the {N:job title} from {N:place} wants the {N:eponym} back; {N:number}; {N:number}.",
    "{N:word name} someone ask {N:organisation} whether the {N:eponym} passed? {N:job title} sign-off: "
    "{N:number}.",
    "Copied to the {N:job title} and the {N:job title}. {N:word name} and {N:word name} noted. {N:number}.",
]

_SLOT = re.compile(r"\{([A-Z0-9]+)(?::([a-z ]+))?\}")


def _doc(domain: str, template: str, r: random.Random, names: Names) -> Doc:
    out, spans, negs, pos = [], [], [], 0
    people: list[tuple[str, str]] = []
    for m in _SLOT.finditer(template):
        lit = template[pos:m.start()]
        out.append(lit)
        at = sum(map(len, out))
        kind, arg = m.group(1), m.group(2)
        if kind == "P":
            first, last = names.person() if not people or r.random() < 0.75 else r.choice(people)
            people.append((first, last))
            value = render(first, last, arg, r)
            if arg == "upper" or template[:m.start()].rstrip().endswith(("DR.",)):
                value = value.upper()
            spans.append(("PERSON", at, at + len(value)))
        elif kind == "N":
            value = _neg(r, arg)
            negs.append((arg, at, at + len(value)))
        else:
            value = VALUES[kind](r)
            spans.append((TYPE_OF.get(kind, kind), at, at + len(value)))
        out.append(value)
        pos = m.end()
    out.append(template[pos:])
    return Doc("".join(out), spans, negs, domain)


def build(split: str = "eval", docs: int = 400, seed: int = 20) -> list[Doc]:
    """`docs` documents of one split; the same arguments give the same corpus."""
    if split not in ("dev", "eval"):
        raise ValueError(f"unknown split {split!r}; use dev or eval")
    r = random.Random(f"{split}-{seed}")
    names = Names(split, r)
    templates = DEV if split == "dev" else EVAL
    codas = DEV_CODA if split == "dev" else EVAL_CODA
    return [_doc(templates[i % len(templates)][0], templates[i % len(templates)][1] + "\n" + r.choice(codas), r, names)
            for i in range(docs)]


@dataclass
class Score:
    """Per-type counts: a label is found when findings of its type cover every letter and digit of it; a
    finding is right when it overlaps a label of its type; a look-alike is kept when no finding touches it."""

    found: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    right: dict = field(default_factory=dict)
    reported: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    negatives: dict = field(default_factory=dict)

    def recall(self, t: str) -> float:
        return self.found.get(t, 0) / self.labels[t] if self.labels.get(t) else float("nan")

    def precision(self, t: str) -> float:
        return self.right.get(t, 0) / self.reported[t] if self.reported.get(t) else 1.0

    def kept_rate(self, cat: str | None = None) -> float:
        if cat is None:
            return sum(self.kept.values()) / max(1, sum(self.negatives.values()))
        return self.kept.get(cat, 0) / max(1, self.negatives.get(cat, 0))


def _inc(d: dict, k: str) -> None:
    d[k] = d.get(k, 0) + 1


def score(docs: list[Doc], findings_of) -> Score:
    """Score `findings_of(text) -> [(type, start, end), ...]` on `docs`."""
    sc = Score()
    for d in docs:
        found = findings_of(d.text)
        for t, s, e in d.spans:
            _inc(sc.labels, t)
            covered = set()
            for ft, fs, fe in found:
                if ft == t and fs < e and fe > s:
                    covered.update(range(max(s, fs), min(e, fe)))
            if all(i in covered for i in range(s, e) if d.text[i].isalnum()):
                _inc(sc.found, t)
        for ft, fs, fe in found:
            _inc(sc.reported, ft)
            if any(t == ft and fs < e and fe > s for t, s, e in d.spans):
                _inc(sc.right, ft)
        for cat, s, e in d.negatives:
            _inc(sc.negatives, cat)
            if not any(fs < e and fe > s for _, fs, fe in found):
                _inc(sc.kept, cat)
    return sc


if __name__ == "__main__":
    for d in build(sys.argv[1] if len(sys.argv) > 1 else "dev", 6):
        print(d.domain, "|", d.text.replace("\n", " / "))
        print("   ", [(t, d.text[s:e]) for t, s, e in d.spans])
        print("   ", [(c, d.text[s:e]) for c, s, e in d.negatives])
