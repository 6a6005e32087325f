"""A labeled PII test set, generated from a seed: sentences with known spans of each type, and hard
negatives (order numbers, versions, timestamps, hashes, code) that must not be flagged.

Regenerate or inspect: `python tests/pii_labeled.py` prints a sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Case:
    text: str
    spans: list[tuple[str, int, int]]  # (type, start, end)


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    for check in "0123456789":
        digits = body + check
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch)
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return digits
    raise AssertionError


def _group(d: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for s in sizes:
        out.append(d[i:i + s])
        i += s
    if i < len(d):
        out.append(d[i:])
    return sep.join(x for x in out if x)


def card(rng):
    brand = rng.choice(["visa", "mc", "amex", "disc", "mc2"])
    if brand == "visa":
        d = _luhn_complete("4", 16, rng)
    elif brand == "mc":
        d = _luhn_complete(str(rng.randint(51, 55)), 16, rng)
    elif brand == "mc2":
        d = _luhn_complete(str(rng.randint(2221, 2720)), 16, rng)
    elif brand == "amex":
        d = _luhn_complete(rng.choice(["34", "37"]), 15, rng)
        return rng.choice([d, _group(d, [4, 6, 5], " "), _group(d, [4, 6, 5], "-")])
    else:
        d = _luhn_complete("6011", 16, rng)
    return rng.choice([d, _group(d, [4, 4, 4, 4], " "), _group(d, [4, 4, 4, 4], "-")])


def _iban_check(cc: str, bban: str) -> str:
    moved = bban + cc + "00"
    n = int("".join(str(int(c, 36)) for c in moved))
    return f"{98 - n % 97:02d}"


def iban(rng):
    cc, fmt = rng.choice([("DE", "n18"), ("GB", "a4n14"), ("NO", "n11"), ("FR", "n10a11n2"), ("NL", "a4n10"),
                          ("ES", "n20"), ("CH", "n17")])
    bban = ""
    i = 0
    while i < len(fmt):
        kind = fmt[i]
        j = i + 1
        while j < len(fmt) and fmt[j].isdigit():
            j += 1
        n = int(fmt[i + 1:j])
        alphabet = "0123456789" if kind == "n" else "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        if kind == "a" and cc in ("GB", "NL"):
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        bban += "".join(rng.choice(alphabet) for _ in range(n))
        i = j
    full = cc + _iban_check(cc, bban) + bban
    return rng.choice([full, " ".join(full[k:k + 4] for k in range(0, len(full), 4))])


def email(rng):
    user = rng.choice(["jane.doe", "j_smith", "ops-team", "k.nakamura+alerts", "admin", "m.o'neil", "x1"])
    dom = rng.choice(["example.com", "mail.halvorsen-dyn.example", "hospital.org", "sub.domain.co.uk"])
    return f"{user}@{dom}"


def phone(rng):
    return rng.choice([
        f"+1 ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
        f"+44 20 {rng.randint(7000, 7999)} {rng.randint(1000, 9999)}",
        f"+47 {rng.randint(400, 999)} {rng.randint(10, 99)} {rng.randint(100, 999)}",
        f"+49 30 {rng.randint(1000000, 9999999)}",
        f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
        f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
        f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
        f"{rng.randint(201, 989)}.{rng.randint(200, 999)}.{rng.randint(1000, 9999)}",
        f"+81 3 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
        f"+61{rng.randint(400000000, 499999999)}",
    ])


def ssn(rng):
    return f"{rng.randint(100, 665):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"


def ipv4(rng):
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def ipv6(rng):
    groups = [f"{rng.randint(0, 0xffff):x}" for _ in range(8)]
    return rng.choice([":".join(groups), f"2001:db8::{groups[0]}:{groups[1]}", f"fe80::{groups[2]}:{groups[3]}:{groups[4]}"])


def dob(rng):
    y, m, d = rng.randint(1940, 2010), rng.randint(1, 12), rng.randint(1, 28)
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"]
    return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}", f"{d}.{m}.{y}", f"{months[m - 1]} {d}, {y}",
                       f"{d} {months[m - 1]} {y}"])


def mrn(rng):
    return rng.choice([f"{rng.randint(10000000, 99999999)}", f"MRN-{rng.randint(100000, 999999)}",
                       f"HD-{rng.randint(100000, 999999)}", f"A{rng.randint(1000000, 9999999)}"])


def passport(rng):
    return rng.choice([f"X{rng.randint(1000000, 9999999)}", f"{rng.randint(100000000, 999999999)}",
                       f"P{rng.randint(10000000, 99999999)}"])


POSITIVE = {
    "EMAIL": (email, ["Write to {} for access.", "Contact: {}", "cc {}, thanks", "<{}>", "Sent by {} at noon."]),
    "PHONE": (phone, ["Call me on {} tonight.", "Phone: {}", "Reach the desk at {}.", "tel. {}", "mobile {} (after 6pm)"]),
    "SSN": (ssn, ["SSN: {}", "My social security number is {}.", "Employee SSN {} on file", "ssn {}"]),
    "CARD": (card, ["Card number {} exp 09/27.", "Charge it to {} please.", "Visa: {}", "paid with {}"]),
    "IBAN": (iban, ["IBAN: {}", "Transfer to {} by Friday.", "Account {}, ref 22.", "Bank details: {}"]),
    "IPV4": (ipv4, ["The host at {} is down.", "ssh to {} now", "Blocked source {}.", "server {}:8080"]),
    "IPV6": (ipv6, ["Listening on {} only.", "Address {} assigned.", "ping6 {} failed"]),
    "DOB": (dob, ["Date of birth: {}", "DOB {}", "Patient was born on {}.", "birthdate: {}"]),
    "MRN": (mrn, ["MRN: {}", "Medical record number {}", "Patient ID: {}", "patient no. {}"]),
    "PASSPORT": (passport, ["Passport number {}", "passport no. {}", "Passport: {}", "his passport # {}"]),
}

NEGATIVE = [
    "Order #{o} shipped on 2024-03-15.", "Invoice 2023-{n4} is overdue by 30 days.", "Upgrade to version 1.2.3.4 today.",
    "The meeting is at 12:30:45 UTC.", "Build 20240115 passed all tests.", "ISBN 978-3-16-148410-0 is on the shelf.",
    "Commit a1b2c3d4e5f6 fixed it.", "Temperature was 23.5 degrees on 2024-01-02.", "It costs $1,234.56 per unit.",
    "Use std::vector<int> and a::b in C++.", "Tracking number 1Z999AA10123456784 arrived.", "Serial 1234-5678 replaced.",
    "Room 101, floor 3, building 7.", "Coordinates 59.9139, 10.7522 mark the site.", "Part no. 4111-1111 is spare.",
    "The pressure held at 82.4 bar for 5 minutes.", "Ticket 55512345 was closed.", "Sprint 2024-W07 starts Monday.",
    "Ratio 3:4:5 holds.", "Shipment {o} left the dock.", "Reference {n4}-{n4}-{n4} confirmed.", "Call count was 1234567.",
    "The deadline is 03/15/2025.", "See section 4.2.1.3 for details.", "Port 8080 and 443 are open.",
    "MAC 00:1A:2B:3C:4D:5E belongs to the pump.", "Rack A12 runs firmware v2.10.3.", "We sold 4000 units in Q3.",
]


def build(seed: int = 1234, per_type: int = 200, negatives: int = 400) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    for typ, (gen, templates) in POSITIVE.items():
        for _ in range(per_type):
            value = gen(rng)
            tpl = rng.choice(templates)
            prefix = rng.choice(["", "Note: ", "Per the ticket, ", "FYI. "])
            text = prefix + tpl.format(value)
            start = text.index(value)
            cases.append(Case(text, [(typ, start, start + len(value))]))
    for _ in range(negatives):
        t = rng.choice(NEGATIVE)
        o = _luhn_complete("4", 16, rng)  # an order number that even passes Luhn
        cases.append(Case(t.format(o=o, n4=rng.randint(1000, 9999)), []))
    return cases


if __name__ == "__main__":
    for c in build()[::97]:
        print(c.spans, c.text)
