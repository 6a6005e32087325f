"""Generator of the synthetic sample corpus used by the demo and the tests.

Everything is invented and seeded: an engineering handbook of a fictional site (markdown), a mailbox
(.eml files and an mbox), a small code repository, tables (CSV and Parquet), a PDF, a DOCX, the site
clinic's ward and procedure notes (markdown, with people named in the prose), JSONL
instruction/response pairs about the handbook, and JSONL preference rows (prompt, chosen, rejected).
Fake PII is seeded throughout so scrubbing has work to do.
The site's own vocabulary recurs often enough that a tiny model trained on it picks the terms up.

Run: `appliance samples --out DIR` (or `python -m appliance.samples DIR`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import zlib
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

ORG = "Halvorsen Dynamics"
SITE = "Ridgeback Station"

# Each site term with facts the handbook states and the Q&A pairs ask about.
TERMS = [
    ("KESTREL telemetry bus", "carries sensor frames from the field racks to the control room",
     "every 250 milliseconds", "the Signals cell", "a frame gap longer than 3 seconds"),
    ("FROSTLINE calibration", "aligns the cryogenic sensors against the reference bath",
     "every 14 days", "the Metrology cell", "a drift above 0.4 kelvin"),
    ("Q-loop interlock", "stops the coolant pumps when pressure and flow disagree",
     "on every shift handover", "the Process Safety team", "a mismatch held for 5 seconds"),
    ("tarn valve", "isolates the secondary coolant circuit",
     "every 30 days", "the Mechanical crew", "a seat leak above 2 litres per hour"),
    ("BRISK-7 controller", "runs the pump sequencing logic in rack C",
     "after every firmware change", "the Controls group", "a watchdog reset"),
    ("amber hold", "freezes all non-essential work on the plant floor",
     "whenever two alarms share a zone", "the Shift Supervisor", "an unexplained alarm pair"),
    ("Corvid array", "watches the perimeter with thermal cameras",
     "every night at 02:00", "the Site Security office", "a dark camera for more than 10 minutes"),
    ("marrow log", "records every manual override on the plant",
     "at the end of each shift", "the Shift Supervisor", "an override without a marrow log entry"),
    ("Sentinel drill", "rehearses the full evacuation of the station",
     "every quarter", "the Emergency Planning team", "a muster time above 12 minutes"),
    ("HALO permit", "authorises hot work near the coolant lines",
     "before each hot work task", "the Permit Office", "work started without a HALO permit"),
    ("Greyfield backup", "copies the control historian to the vault room",
     "every 6 hours", "the Data Operations team", "a backup older than 12 hours"),
    ("Ridgeback checklist", "walks operators through the start-up sequence",
     "before every cold start", "the Operations lead", "a skipped checklist step"),
    ("Lumen board", "shows the live state of every pump and valve",
     "continuously", "the Control Room operators", "a stale tile older than 60 seconds"),
    ("Pike relay", "switches the station to the backup feeder",
     "every 90 days in a test", "the Electrical crew", "a transfer longer than 400 milliseconds"),
    ("Osprey sampler", "takes water samples from the outfall",
     "every 4 hours", "the Environmental cell", "a missed sample window"),
    ("Fathom gauge", "measures the level in the storage tanks",
     "every 10 seconds", "the Instrumentation crew", "a level jump above 5 percent"),
    ("Cinder report", "summarises every near miss for the weekly review",
     "every Friday", "the Process Safety team", "a near miss missing from the Cinder report"),
    ("Bastion gateway", "is the only path from the plant network to the office network",
     "on every connection attempt", "the Site Security office", "traffic that bypasses the Bastion gateway"),
]

FIRST = ["Ingrid", "Tomas", "Amara", "Lucas", "Priya", "Jonas", "Elena", "Marcus", "Sofia", "Kenji", "Nadia",
         "Oskar", "Leila", "Daniel", "Hanna", "Victor", "Maren", "Samuel", "Freya", "Arjun"]
LAST = ["Lindqvist", "Okafor", "Berg", "Moreau", "Ramesh", "Haugen", "Costa", "Whitfield", "Nakamura", "Aziz",
        "Petrov", "Dahl", "Brennan", "Solberg", "Iversen", "Marsh", "Quinn", "Falk", "Rowe", "Ekstrom"]
DOMAIN = "halvorsen-dyn.example"
CARDS = ["4111 1111 1111 1111", "5500 0000 0000 0004", "3400 000000 00009", "4012888888881881"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "NO93 8601 1117 947",
         "FR14 2004 1010 0505 0001 3M02 606"]

TEMPLATES = [
    "The {t} {what}. It is checked {when}, and {who} owns it.",
    "At {site}, the {t} {what}.",
    "{Who} is responsible for the {t}; operators escalate {trigger} to them at once.",
    "Check the {t} {when}. Record the result in the marrow log.",
    "If you see {trigger}, treat it as a fault of the {t} and call {who}.",
    "New operators learn that the {t} {what} before they stand a shift alone.",
    "A healthy {t} shows no {trigger}; anything else goes into the Cinder report.",
    "During an amber hold the {t} stays under the watch of {who}.",
    "Why does the {t} matter? Because it {what}, and {trigger} has stopped the plant before.",
    "The {t} is inspected {when} under the Ridgeback checklist.",
]


def _person(rng: random.Random) -> tuple[str, str, str]:
    f, last = rng.choice(FIRST), rng.choice(LAST)
    return f, last, f"{f.lower()}.{last.lower()}@{DOMAIN}"


def _phone(rng: random.Random) -> str:
    return rng.choice([
        f"+47 {rng.randint(400, 999)} {rng.randint(10, 99)} {rng.randint(100, 999)}",
        f"+1 ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
        f"+44 20 {rng.randint(7000, 7999)} {rng.randint(1000, 9999)}",
        f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
    ])


def _ssn(rng: random.Random) -> str:
    return f"{rng.randint(100, 665):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"


def _fill(tpl: str, term: tuple) -> str:
    t, what, when, who, trigger = term
    s = tpl.format(t=t, what=what, when=when, who=who, Who=who[0].upper() + who[1:], trigger=trigger, site=SITE)
    return s[0].upper() + s[1:]


# --- handbook ------------------------------------------------------------------------------------
def _handbook(out: Path, rng: random.Random) -> None:
    d = out / "handbook"
    d.mkdir(parents=True)
    (d / "00-welcome.md").write_text(
        f"# {SITE} engineering handbook\n\nThis handbook belongs to {ORG}. It describes how {SITE} runs: "
        "its systems, its checks and who owns them. Every operator reads it before the first shift.\n\n"
        "Questions about this handbook go to the Operations lead, Ingrid Lindqvist "
        f"(ingrid.lindqvist@{DOMAIN}, +47 915 22 318).\n", encoding="utf-8")
    for i, term in enumerate(TERMS, start=1):
        lines = [f"# {term[0]}\n", f"_Owner: {term[3]}. Review cycle: {term[2]}._\n"]
        for sec in ("Purpose", "Routine checks", "Faults and escalation", "Notes from the floor"):
            lines.append(f"\n## {sec}\n")
            for _ in range(5):
                sentences = [_fill(rng.choice(TEMPLATES), term) for _ in range(rng.randint(3, 5))]
                other = rng.choice(TERMS)
                sentences.append(_fill(rng.choice(TEMPLATES), other))
                lines.append(" ".join(sentences) + "\n")
        if i % 4 == 0:
            f, last, mail = _person(rng)
            lines.append(f"\nContact for this chapter: {f} {last}, {mail}, phone {_phone(rng)}.\n")
        slug = term[0].lower().replace(" ", "-")
        (d / f"{i:02d}-{slug}.md").write_text("".join(lines), encoding="utf-8")
    (d / "glossary.rst").write_text(
        "Glossary\n========\n\n" + "".join(f"{t}\n    The {t} {what}.\n\n" for t, what, *_ in TERMS),
        encoding="utf-8")
    # an exact duplicate, which ingest removes and counts
    (d / "00-welcome-copy.md").write_bytes((d / "00-welcome.md").read_bytes())


# --- mail ----------------------------------------------------------------------------------------
def _message(rng: random.Random, when: datetime) -> EmailMessage:
    (f1, l1, m1), (f2, l2, m2) = _person(rng), _person(rng)
    term = rng.choice(TERMS)
    msg = EmailMessage()
    msg["From"] = f"{f1} {l1} <{m1}>"
    msg["To"] = f"{f2} {l2} <{m2}>"
    msg["Date"] = format_datetime(when)
    msg["Subject"] = rng.choice([f"{term[0]} check", f"Question about the {term[0]}", f"Re: {term[0]} fault",
                                 "Shift handover", "Badge renewal", "Clinic appointment"])
    body = [f"Hi {f2},", "", _fill(rng.choice(TEMPLATES), term), _fill(rng.choice(TEMPLATES), term)]
    extra = rng.random()
    if extra < 0.25:
        body.append(f"You can reach me on {_phone(rng)} if the {term[0]} acts up again.")
    elif extra < 0.4:
        body.append(f"For the travel claim, my card is {rng.choice(CARDS)} and my IBAN is {rng.choice(IBANS)}.")
    elif extra < 0.55:
        body.append(f"HR asked for my SSN again: {_ssn(rng)}. Please keep it to yourself.")
    elif extra < 0.7:
        dob = datetime(1960 + rng.randint(0, 40), rng.randint(1, 12), rng.randint(1, 28))
        body.append(f"The occupational health clinic booked me. Patient ID: HD-{rng.randint(100000, 999999)}, "
                    f"date of birth {dob:%Y-%m-%d}.")
    elif extra < 0.8:
        body.append(f"The historian at 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} "
                    "stopped answering during the backup.")
    body += ["", rng.choice(["Best regards,", "Thanks,", "Regards,", "Cheers,"]), f"{f1} {l1}",
             f"{ORG}, {SITE}"]
    msg.set_content("\n".join(body))
    if rng.random() < 0.15:
        msg.add_attachment(f"checklist for the {term[0]}\n1. {term[2]}\n2. escalate {term[4]}\n",
                           filename="checklist.txt")
    return msg


def _mail(out: Path, rng: random.Random) -> None:
    d = out / "mail"
    d.mkdir(parents=True)
    start = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    for i in range(40):
        (d / f"msg-{i:03d}.eml").write_bytes(bytes(_message(rng, start + timedelta(hours=7 * i))))
    with open(d / "archive.mbox", "wb") as f:
        for i in range(60):
            msg = _message(rng, start - timedelta(days=60 - i))
            f.write(b"From MAILER-DAEMON Mon Jan  1 00:00:00 2025\n")
            raw = bytes(msg).replace(b"\nFrom ", b"\n>From ")
            f.write(raw if raw.endswith(b"\n") else raw + b"\n")
            f.write(b"\n")


# --- code repository -----------------------------------------------------------------------------
def _repo(out: Path, rng: random.Random) -> None:
    r = out / "kestrel-tools"
    (r / "src" / "kestrel").mkdir(parents=True)
    (r / "native").mkdir()
    (r / "vendor" / "minijson").mkdir(parents=True)
    (r / "assets").mkdir()
    (r / "secrets").mkdir()
    (r / ".gitignore").write_text("*.log\nsecrets/\nbuild/\n__pycache__/\n", encoding="utf-8")
    (r / "README.md").write_text(
        "# kestrel-tools\n\nTools for the KESTREL telemetry bus at Ridgeback Station.\n\n"
        "Maintainer: Tomas Okafor <tomas.okafor@halvorsen-dyn.example>\n", encoding="utf-8")
    (r / "src" / "kestrel" / "__init__.py").write_text('"""KESTREL telemetry bus tools."""\n', encoding="utf-8")
    (r / "src" / "kestrel" / "frames.py").write_text('''"""Decode KESTREL frames from the field racks."""

import struct

FRAME_PERIOD_MS = 250  # the bus sends a frame every 250 milliseconds
GAP_ALARM_S = 3.0  # a frame gap longer than 3 seconds is a fault


def decode(raw: bytes) -> dict:
    """Split a raw frame into rack id, sequence number and readings."""
    rack, seq, count = struct.unpack_from(">HIH", raw)
    values = struct.unpack_from(f">{count}f", raw, 8)
    return {"rack": rack, "seq": seq, "values": list(values)}


def gap_fault(prev_ts: float, ts: float) -> bool:
    """True when the gap between two frames calls for the Signals cell."""
    return ts - prev_ts > GAP_ALARM_S
''', encoding="utf-8")
    (r / "src" / "kestrel" / "frostline.py").write_text('''"""FROSTLINE calibration helpers."""

DRIFT_LIMIT_K = 0.4  # drift above 0.4 kelvin fails the FROSTLINE calibration
INTERVAL_DAYS = 14


def drift(readings: list[float], reference: float) -> float:
    """Largest absolute deviation from the reference bath, in kelvin."""
    return max(abs(r - reference) for r in readings)


def passes(readings: list[float], reference: float) -> bool:
    return drift(readings, reference) <= DRIFT_LIMIT_K
''', encoding="utf-8")
    (r / "native" / "qloop.c").write_text('''/* Q-loop interlock: stop the pumps when pressure and flow disagree. */
#include <stdbool.h>

#define MISMATCH_HOLD_MS 5000

bool qloop_trip(double pressure, double flow, int held_ms) {
    double expected = pressure * 0.82;
    return (flow < expected * 0.9 || flow > expected * 1.1) && held_ms >= MISMATCH_HOLD_MS;
}
''', encoding="utf-8")
    (r / "vendor" / "minijson" / "minijson.py").write_text("# vendored third-party code\nVERSION = '0.1'\n")
    noise = bytes(rng.randrange(256) for _ in range(64))
    (r / "assets" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + noise)
    (r / "debug.log").write_text("ignored by .gitignore\n", encoding="utf-8")
    (r / "secrets" / "token.txt").write_text("ignored by .gitignore\n", encoding="utf-8")


# --- tables --------------------------------------------------------------------------------------
def _tables(out: Path, rng: random.Random) -> None:
    d = out / "tables"
    d.mkdir(parents=True)
    rows = ["asset_id,name,location,owner,owner_email,risk_class,last_inspection"]
    for i in range(240):
        term = rng.choice(TERMS)
        f, last, mail = _person(rng)
        rows.append(f"RB-{1000 + i},{term[0]} unit {i % 12 + 1},rack {chr(65 + i % 6)},{f} {last},{mail},"
                    f"{rng.choice(['low', 'medium', 'high', 'critical'])},2025-{rng.randint(1, 12):02d}-"
                    f"{rng.randint(1, 28):02d}")
    (d / "equipment.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    visits = ["patient_name,date_of_birth,mrn,visit_date,reason"]
    for _ in range(60):
        f, last, _m = _person(rng)
        visits.append(f"{f} {last},19{rng.randint(55, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},"
                      f"MRN-{rng.randint(100000, 999999)},2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},"
                      f"{rng.choice(['hearing test', 'annual check', 'cold exposure review', 'eye test'])}")
    (d / "clinic_visits.csv").write_text("\n".join(visits) + "\n", encoding="utf-8")
    _parquet(d / "inspections.parquet", rng)


def _parquet(path: Path, rng: random.Random) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 200
    terms = [rng.choice(TERMS)[0] for _ in range(n)]
    table = pa.table({
        "inspection_id": list(range(1, n + 1)),
        "system": terms,
        "result": [rng.choice(["pass", "pass", "pass", "fail", "deferred"]) for _ in range(n)],
        "inspector_email": [_person(rng)[2] for _ in range(n)],
        "minutes": [rng.randint(5, 90) for _ in range(n)],
    })
    pq.write_table(table, path)


# --- PDF and DOCX --------------------------------------------------------------------------------
def _pdf_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def write_pdf(path: Path, pages: list[list[str]], title: str) -> None:
    """A minimal, valid PDF with Helvetica text; no library needed to write it."""
    objs: list[bytes] = []
    n_pages = len(pages)
    page_ids = [3 + 2 * i for i in range(n_pages)]
    font_id = 3 + 2 * n_pages
    info_id = font_id + 1
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n_pages} >>".encode())
    for i, lines in enumerate(pages):
        body = "BT /F1 11 Tf 14 TL 50 750 Td " + " ".join(f"({_pdf_escape(x)}) Tj T*" for x in lines) + " ET"
        stream = zlib.compress(body.encode("latin-1"))
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {page_ids[i] + 1} 0 R "
                    f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode())
        objs.append(f"<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode() + stream +
                    b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    objs.append(f"<< /Title ({_pdf_escape(title)}) /Producer ({ORG}) >>".encode())
    buf = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(buf))
        buf += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(buf)
    buf += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    buf += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    buf += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R /Info {info_id} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(buf))


def _documents(out: Path, rng: random.Random) -> None:
    d = out / "documents"
    d.mkdir(parents=True)
    pages = []
    for term in TERMS[:6]:
        lines = [f"Safety bulletin: {term[0]}", ""]
        lines += [_fill(rng.choice(TEMPLATES), term) for _ in range(8)]
        pages.append(lines)
    pages[-1] += ["", "Issued by: Elena Costa, Process Safety", "Phone: +47 934 11 207"]
    write_pdf(d / "safety-bulletin.pdf", pages, f"{SITE} safety bulletin")

    import docx

    doc = docx.Document()
    doc.core_properties.title = "FROSTLINE calibration procedure"
    doc.add_heading("FROSTLINE calibration procedure", 1)
    term = TERMS[1]
    for _ in range(10):
        doc.add_paragraph(_fill(rng.choice(TEMPLATES), term))
    doc.add_paragraph("Approved by: Marcus Whitfield")
    t = doc.add_table(rows=3, cols=2)
    for r, (k, v) in enumerate([("Interval", term[2]), ("Owner", "the Metrology cell"),
                                ("Fault", term[4])]):
        t.cell(r, 0).text, t.cell(r, 1).text = k, v
    doc.save(str(d / "frostline-procedure.docx"))


# --- clinic notes --------------------------------------------------------------------------------
# The site's occupational health clinic: ward and procedure notes written the way staff write them, with
# patients, staff and operators named in the prose, and job titles and equipment that are not people.
CLINIC_NOTES = [
    ("ward-round.md", "# Ward round, occupational health bay\n\n"
     "Patient {p1} (MRN: {mrn}, DOB: {dob}) was seen on the ward by Dr. {s1last} after the cold exposure "
     "drill. {p1first} reports numb fingers; capillary refill normal. Admitted on {day}, for review by the "
     "Endoscopy Nurse Manager only if symptoms persist. Nurse {s2last} will repeat the Doppler check at 14:00.\n"),
    ("endoscopy-list.md", "# Endoscopy list\n\n"
     "The scope was reprocessed after the list for patient {p2}. The Senior Biomedical Engineer, {s3}, "
     "replaced the light source (serial number {serial}) and signed the log. Will the Foley catheter stock "
     "last until May? The Endoscopy Nurse Manager says yes.\n"),
    ("needle-stick.md", "# Needle-stick incident report\n\n"
     "Blood was drawn from source patient {p3} after the needle-stick. The injured staff member, {s4}, "
     "was seen by {s1} on {day2}. Witness: {s5lastfirst}. Hope the new sharps bins arrive before August.\n"),
    ("handover.md", "# Night handover\n\n"
     "patient {p4lower} settled overnight; family contact {phone}. Mrs {p4last}'s daughter will visit at 10. "
     "Sgt. {s6last} from site security escorted the 93-year-old visitor. Fax the discharge letter to "
     "{fax}.\n"),
]


def _clinic(out: Path, rng: random.Random) -> None:
    d = out / "clinic"
    d.mkdir(parents=True)
    people = [(rng.choice(FIRST), rng.choice(LAST)) for _ in range(10)]
    full = [f"{f} {last}" for f, last in people]
    values = {
        "p1": full[0], "p1first": people[0][0], "p2": full[1], "p3": full[2], "p4lower": full[3].lower(),
        "p4last": people[3][1], "s1": full[4], "s1last": people[4][1], "s2last": people[5][1], "s3": full[6],
        "s4": full[7], "s5lastfirst": f"{people[8][1]}, {people[8][0]}", "s6last": people[9][1],
        "mrn": f"MRN-{rng.randint(100000, 999999)}", "dob": f"19{rng.randint(55, 99)}-{rng.randint(1, 12):02d}-"
        f"{rng.randint(1, 28):02d}", "day": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "day2": f"March {rng.randint(1, 28)}, 2025", "serial": f"SN-{rng.randint(100000, 999999)}",
        "phone": _phone(rng), "fax": _phone(rng),
    }
    for name, body in CLINIC_NOTES:
        (d / name).write_text(body.format(**values), encoding="utf-8")


# --- instruction pairs ---------------------------------------------------------------------------
QUESTIONS = [
    ("What does the {t} do?", "The {t} {what}."),
    ("How often is the {t} checked?", "The {t} is checked {when}."),
    ("Who owns the {t}?", "{Who} owns the {t}."),
    ("What counts as a fault of the {t}?", "{Trigger} counts as a fault of the {t}; escalate it to {who}."),
    ("I see {trigger}. What should I do?", "Treat it as a fault of the {t} and call {who} at once."),
]


def _pairs(out: Path, rng: random.Random) -> None:
    d = out / "instructions"
    d.mkdir(parents=True)
    lines = []
    for term in TERMS:
        t, what, when, who, trigger = term
        for q, a in QUESTIONS:
            kw = dict(t=t, what=what, when=when, who=who, Who=who[0].upper() + who[1:], trigger=trigger,
                      Trigger=trigger[0].upper() + trigger[1:])
            lines.append({"instruction": q.format(**kw), "response": a.format(**kw)})
    rng.shuffle(lines)
    (d / "handbook-qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def _preferences(out: Path, rng: random.Random) -> None:
    """Prompt / chosen / rejected rows for preference tuning: the handbook's answer is preferred over the
    same answer with another system's fact in it, and over a non-answer."""
    d = out / "preferences"
    d.mkdir(parents=True)
    lines = []
    evasive = ["I am not sure; check with someone on site.", "That is not something I can answer.",
               "It depends on the situation."]
    for i, term in enumerate(TERMS):
        t, what, when, who, trigger = term
        other = TERMS[(i + 1 + rng.randrange(len(TERMS) - 1)) % len(TERMS)]  # never the same term
        for q, a in QUESTIONS[:3]:
            kw = dict(t=t, what=what, when=when, who=who, Who=who[0].upper() + who[1:], trigger=trigger,
                      Trigger=trigger[0].upper() + trigger[1:])
            wrong = {**kw, "what": other[1], "when": other[2], "who": other[3],
                     "Who": other[3][0].upper() + other[3][1:]}
            rejected = a.format(**wrong) if rng.random() < 0.75 else rng.choice(evasive)
            lines.append({"prompt": q.format(**kw), "chosen": a.format(**kw), "rejected": rejected})
    rng.shuffle(lines)
    (d / "handbook-prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def _task_demos(out: Path) -> None:
    """Worked episodes of the shipped asset-risk task (train episodes only), one row per model turn: the
    call, then the answer from the tool's real result. SFT on them gives a model that sometimes completes
    the task, which GRPO on the task then improves."""
    from appliance import tasks

    task = tasks.load("asset-risk")
    rows = []
    for i in task.indexes("train"):
        ep = tasks.Episode(task, i)
        asset, risk = ep.task.episodes[i]["vars"]["asset"], ep.task.episodes[i]["expect"]
        call = json.dumps({"name": "lookup", "arguments": {"asset": asset}})
        rows.append({"instruction": ep.prompt(), "response": call})
        ep.step(call)
        if not ep.calls[-1]["ok"]:
            raise RuntimeError(f"the asset-risk tool failed while writing its worked episodes: {ep.calls[-1]['error']}")
        answer = f"{risk} risk"
        rows.append({"instruction": ep.prompt(), "response": answer})
    d = out / "tasks"
    d.mkdir()
    (d / "asset-risk-demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def generate(out: Path, seed: int = 7) -> dict:
    """Write the corpus under `out` (which must not exist or be empty); return a manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        from appliance.errors import ApplianceError
        raise ApplianceError(f"{out} is not empty", "pick a new directory for the samples")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written in a private (0700, fresh) directory and renamed into place: a link planted in a shared `out`
    # meanwhile is never written through. rename() replaces an empty directory, and refuses a link or a file.
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rng = random.Random(seed)
        for part in (_handbook, _mail, _repo, _tables, _documents, _pairs, _preferences):
            part(build, rng)
        _clinic(build, random.Random(seed + 1000))  # its own stream: the parts above stay as they were
        _task_demos(build)
        os.rename(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    files = [p for p in out.rglob("*") if p.is_file()]
    return {"out": str(out), "files": len(files), "bytes": sum(p.stat().st_size for p in files), "seed": seed,
            "parts": {"handbook": "handbook/", "mail": "mail/", "code": "kestrel-tools/", "tables": "tables/",
                      "clinic": "clinic/",
                      "documents": "documents/", "instructions": "instructions/handbook-qa.jsonl",
                      "preferences": "preferences/handbook-prefs.jsonl",
                      "task_demos": "tasks/asset-risk-demos.jsonl"}}


if __name__ == "__main__":
    print(json.dumps(generate(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 7)))
