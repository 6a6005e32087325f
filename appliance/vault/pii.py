"""PII detection and scrubbing: regex candidates, then validators (Luhn, IBAN mod-97, address parsing,
context words) that keep false positives down, and names of people from context rules over name lists
(`pii_names`). The other Safe Harbor identifiers prose carries live in `pii_safe_harbor`.

Cheap literal pre-checks (`'@' in text`, keyword presence in the lower-cased text, any digit at all) skip
whole detectors on text that cannot hold their type, which is what keeps the scan fast on ordinary prose.
A site chooses which types it scrubs with a `Policy` (`HOME/pii-policy.toml`); every type is on by default.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.vault import pii_hl7, pii_names, pii_safe_harbor
from appliance.vault.pii_base import DATE as _DATE
from appliance.vault.pii_base import Finding

__all__ = ["MODES", "STRUCTURED", "TYPES", "Finding", "Policy", "Scrubber", "detect", "load_policy",
           "site_policy"]

MODES = ("redact", "pseudonymize", "flag", "off")
STRUCTURED = ("EMAIL", "PHONE", "SSN", "CARD", "IBAN", "IPV4", "IPV6")  # detectable from the value alone
TYPES = ("EMAIL", "PHONE", "SSN", "CARD", "IBAN", "IPV4", "IPV6", "DOB", "MRN", "PASSPORT", "PERSON",
         "ADDRESS", "ZIP", "DATE", "AGE", "FAX", "ACCOUNT", "LICENSE", "VEHICLE", "DEVICE", "URL", "DODID")
TYPE_HELP = {
    "EMAIL": "e-mail addresses", "PHONE": "telephone numbers", "SSN": "US social security numbers",
    "CARD": "payment card numbers (Luhn)", "IBAN": "bank account numbers (IBAN, mod-97)",
    "IPV4": "IPv4 addresses", "IPV6": "IPv6 addresses", "DOB": "dates of birth",
    "MRN": "medical record and patient numbers", "PASSPORT": "passport numbers", "PERSON": "names of people",
    "ADDRESS": "street addresses and PO boxes", "ZIP": "ZIP codes (after a state or a label)",
    "DATE": "dates of admission, discharge, death, service and other events of a person",
    "AGE": "ages over 89", "FAX": "fax numbers", "ACCOUNT": "health-plan, insurance, member and account numbers",
    "LICENSE": "licence, certificate, DEA and NPI numbers", "VEHICLE": "VINs and licence plates",
    "DEVICE": "device identifiers and serial numbers", "URL": "web addresses", "DODID": "DoD ID numbers (EDIPI)",
}


# --- email ---------------------------------------------------------------------------------------
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-'")


def _emails(text: str, _low: str, _regions):
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        i = m.start()
        while i > 0 and text[i - 1] in _LOCAL_CHARS:
            i -= 1
        while i < m.start() and text[i] in ".'":
            i += 1
        if i < m.start():
            yield Finding("EMAIL", i, m.end(), text[i:m.end()])


# --- numeric regions ---------------------------------------------------------------------------
# Cards, SSNs, phones and IPv4 addresses all contain a run of at least 7 digits and separators. Finding
# those runs is one fast scan (the pattern starts with a digit class, which the regex engine can skip
# to); the precise detectors then run only around each run.
_NUM_REGION = re.compile(r"\d[\d .()/+-]{5,}\d")
_NUM_REGION_SHAPE = re.compile(rb"0[0 .()/+-]{5,}0")  # the same in digit shapes (`pii_safe_harbor.digit_shapes`)


def _regions(text: str, digits: bytes | None = None) -> tuple[list[tuple[int, int]], int, bool]:
    """The windows around the numeric runs, the most digits one run holds, and whether any run holds a ".".

    A card number (13 digits at least), an SSN (9), a phone number (7) and an IPv4 address (with its dots) each
    lie within one run, since every character they hold is one a run is made of (a phone's "(555)\n" aside,
    whose other 7 digits make a run of their own): a text whose runs are too short for one, or hold no dot, is
    not searched for it at all. Mail headers' dates and times are runs of 6 digits."""
    windows, most, dotted, n = [], 0, False, len(text)
    for m in (_NUM_REGION.finditer(text) if digits is None else _NUM_REGION_SHAPE.finditer(digits)):
        start, end = m.span()
        windows.append((max(0, start - 5), min(n, end + 3)))
        if digits is None:  # `isdigit` holds every `\d` (and a few more: this only ever rules out too little)
            most = max(most, sum(map(str.isdigit, text[start:end])))
            dotted = dotted or text.find(".", start, end) != -1
        else:
            most = max(most, digits.count(b"0", start, end))
            dotted = dotted or digits.find(b".", start, end) != -1
    return windows, most, dotted


def _in_regions(pattern: re.Pattern, text: str, regions):
    """Matches of `pattern` inside the windows; overlapping windows are merged first so that no match
    is cut at a window's edge (once per text: a `Scan` keeps its merged windows for every detector)."""
    merged = getattr(regions, "merged", None)
    if merged is None:
        merged = []
        for start, end in regions:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        if isinstance(regions, pii_safe_harbor.Scan):
            regions.merged = merged
    return [m for start, end in merged for m in pattern.finditer(text, start, end)]  # a list: no generator


# --- payment cards -------------------------------------------------------------------------------
# The digit first, the look-behind after it (the same test, on the character before the digit): a pattern that
# starts with a character class lets the engine skip to the next digit in C, one that starts with an assertion
# is tried at every position.
_CARD = re.compile(r"\d(?<![\d.-]\d)(?:[ -]?\d){12,18}(?![\d-])")
_CARD_NEGATIVE = re.compile(r"(?i)(?:order|invoice|tracking|ref(?:erence)?|serial|part|ticket|account|isbn|shipment"
                            r"|parcel|package|consignment|batch|lot|waybill)"
                            r"[\s\w.#:-]{0,12}$")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_brand_ok(d: str) -> bool:
    n = len(d)
    p2, p4 = int(d[:2]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if p4 == 6011 or p2 == 65 or 644 <= int(d[:3]) <= 649 or p2 == 62:
        return 16 <= n <= 19
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19
    if 300 <= int(d[:3]) <= 305 or p2 in (36, 38):
        return 14 <= n <= 19
    return False


def _cards(text: str, low: str, regions):
    if regions.most_digits < 13:
        return
    for m in _in_regions(_CARD, text, regions):
        d = m.group().replace(" ", "").replace("-", "")
        if 13 <= len(d) <= 19 and _card_brand_ok(d) and luhn_ok(d):
            if _CARD_NEGATIVE.search(low, max(0, m.start() - 30), m.start()):
                continue
            yield Finding("CARD", m.start(), m.end(), m.group())


# --- IBAN ----------------------------------------------------------------------------------------
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")  # no leading \b: it would defeat the fast skip


def iban_ok(compact: str) -> bool:
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(text: str, _low: str, regions):
    # Every IBAN format holds a run of 7+ digits (the account number), so IBANs are looked for only
    # around the numeric regions, up to an IBAN's length either side.
    windows = [(max(0, s - 34), e + 34) for s, e in regions]
    for m in _in_regions(_IBAN, text, windows):
        want = IBAN_LENGTHS.get(m.group()[:2])
        if want is None or (m.start() and text[m.start() - 1].isalnum()):
            continue
        end, seen = m.start(), 0
        while end < m.end() and seen < want:  # cut at the country's length: "...00 IN" must not swallow "IN"
            if text[end] != " ":
                seen += 1
            end += 1
        if seen == want and (end == len(text) or not text[end].isalnum()):
            if iban_ok(text[m.start():end].replace(" ", "")):
                yield Finding("IBAN", m.start(), end, text[m.start():end])


# --- SSN -----------------------------------------------------------------------------------------
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_SSN_BARE = re.compile(r"(?i)(?:ssn|social security(?: number| no\.?)?)\s*(?:#|no\.?|number)?\s*[:=]?\s*"
                       r"(?:is\s+)?((?!000|666|9\d\d)\d{9})(?!\d)")


def _ssns(text: str, low: str, regions):
    for m in _in_regions(_SSN, text, regions) if regions.most_digits >= 9 else ():
        if m.group(1) == " " and "ssn" not in low and "social security" not in low:
            continue  # "123 45 6789" is too ambiguous without context
        yield Finding("SSN", m.start(), m.end(), m.group())
    if "ssn" in low or "social security" in low:
        for m in _SSN_BARE.finditer(text):
            yield Finding("SSN", m.start(1), m.end(1), m.group(1))


# --- IP addresses --------------------------------------------------------------------------------
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)")
_NOT_IP_BEFORE = re.compile(r"(?i)\b(?:version|ver\.?|v|release|build|section|chapter|clause|para(?:graph)?|§)\s*$")
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")  # starts with a literal: the engine skips to colons fast
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:")


def _ipv4s(text: str, _low: str, regions):
    if not regions.dotted:
        return
    for m in _in_regions(_IPV4, text, regions):
        if _NOT_IP_BEFORE.search(text, max(0, m.start() - 10), m.start()):
            continue
        yield Finding("IPV4", m.start(), m.end(), m.group())


def _ipv6s(text: str, _low: str, _regions):
    end = 0
    for m in _IPV6_SEED.finditer(text):
        if m.start() < end:
            continue
        start, end = m.start(), m.end()
        while start > 0 and text[start - 1] in _IPV6_CHARS:
            start -= 1
        while end < len(text) and text[end] in _IPV6_CHARS:
            end += 1
        if (start and (text[start - 1].isalnum() or text[start - 1] in "_.")) or \
                (end < len(text) and (text[end].isalnum() or text[end] == "_")):
            continue  # part of a longer token: "std::vector", "a1::b2x"
        s = text[start:end]
        if sum(1 for g in s.split(":") if g) < 3:
            continue  # "a::b" in code
        if "::" not in s and s.count(":") != 7:
            continue  # eight groups, or fewer with "::": times like "08:00:00" are no address (and parse slowly)
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            continue
        yield Finding("IPV6", start, end, s)


# --- phone numbers -------------------------------------------------------------------------------
# The look-behind the three forms share is tested once, then the character every form starts with, and only then
# are the forms tried: at most positions (inside a word or a number, or not before a digit, "+" or "(") the try
# ends there, several times faster than trying each form with its own look-behind.
_PHONE = re.compile(
    r"(?<![\w+])(?=[+(\d])(?:(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,5}(?:[ .-]\d{1,8}){1,5}(?![\w-]|\.\d)"
    r"|\+\d{7,15}(?!\w)|\(\d{3}\)\s?\d{3}-\d{4}(?!\w)"
    r"|\d{7,15}(?:x\d{1,6})?(?![\w-]|\.\d))"  # digits alone ("Phone: 5558675309"): only after a phone's label
)
_US_PHONE = re.compile(r"(?:\+?1[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]\d{4}")
_PHONE_CONTEXT = re.compile(r"(?i)(?:phone|tel|telephone|mobile|cell|fax|call|pager|ext|contact|whatsapp)"
                            r"[\s.:#()\w-]{0,12}$")
_PHONE_LABEL = re.compile(r"(?i)(?<![a-z])(?:phone|tel|telephone|mobile|cell|pager|ph)(?:[ \t]*(?:no\.?|number|#))?"
                          r"(?:[ \t]*\([a-z ]{1,12}\))?[ \t]*[:#.]?[ \t]*$")  # "Phone (home): 5558675309"
_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def _phones(text: str, _low: str, regions):
    if regions.most_digits < 7:
        return
    for m in _in_regions(_PHONE, text, regions):
        s = m.group()
        digits = sum(map(str.isdigit, s))
        if digits < 7 or digits > 15 or _DATE_LIKE.fullmatch(s):
            continue
        if s.startswith("+") and digits >= 8:
            pass
        elif _US_PHONE.fullmatch(s) and digits in (10, 11):
            pass
        elif s.replace("x", "").isdigit():  # digits alone only right after a phone's label: not "Call count was
            if not _PHONE_LABEL.search(text, max(0, m.start() - 32), m.start()):  # 1234567"
                continue
        elif not _PHONE_CONTEXT.search(text, max(0, m.start() - 25), m.start()):
            continue
        yield Finding("PHONE", m.start(), m.end(), s)


# --- context-bound identifiers -------------------------------------------------------------------
_DOB = re.compile(rf"(?i:date of birth|d\.o\.b\.?|dob|birth ?date|born(?: on)?)(?:\b|(?<=\.))[\s:=-]*(?:is |was |on )?"
                  rf"({_DATE})")
_MRN = re.compile(r"(?i:mrn|medical record(?: number| no\.?| #)?|patient (?:id|no\.?|number|#)|chart (?:number|no\.?)"
                  r"|med\.? ?rec(?:ord)?\.?(?: number| no\.?| #)?|(?:hospital|ur|visit|encounter) (?:id|no\.?|number|#)"
                  r"|fin(?= ?(?:#|no\b|number|:)))"
                  r"[\s:#=-]*(?:is\s+)?(?=[A-Z0-9-]*\d)([A-Z]{0,4}-?[A-Z0-9]{4,14}(?:-[A-Z0-9]{1,6})?)\b")
_PASSPORT = re.compile(r"(?i:passport)(?:\s*(?:number|no\.?|#|id))?[\s:#=-]*(?:is\s+)?(?=[A-Z0-9]*\d)([A-Z0-9]{6,9})\b")


def _contextual(text: str, _low: str, scan: pii_safe_harbor.Scan):
    for m in _keyed(_DOB, text, scan, "dob"):
        yield Finding("DOB", m.start(1), m.end(1), m.group(1), "dob")
    for m in _keyed(_MRN, text, scan, "mrn"):
        yield Finding("MRN", m.start(1), m.end(1), m.group(1), "mrn")
    for m in _keyed(_PASSPORT, text, scan, "passport"):
        yield Finding("PASSPORT", m.start(1), m.end(1), m.group(1), "passport")


# --- person names (only where a cheap, reliable signal exists) -----------------------------------
_NAME = (r"[A-Z][a-z'’]+(?:-[A-Z]?[a-z'’]+)?(?: [A-Z]\.)?"
         r"(?: (?:van |de |von |O')?[A-Z][a-z'’]+(?:-[A-Z]?[a-z'’]+)?){1,2}")
_FIELD_WORDS = (
    r"(?:Name|Full name|Patient|Patient name|Employee|Contact|Attn|Attention|Signed|Approved by|Reviewed by"
    r"|Prepared by|Issued by|Author|Maintainer|Reported by|Requested by|Owner|Customer|Client|Technician"
    r"|Engineer|Physician|Doctor|Nurse|Supervisor|Manager|Employee name|Customer name|Owner name|Contact name)"
)
# These are searched in small windows around a colon or a sign-off word found by a fast literal scan:
# a leading \b or alternation would make a scan over the whole text slow.
_FIELD_BEFORE = re.compile(rf"(?<!\w){_FIELD_WORDS}[ \t]*$")
_NAME_AFTER = re.compile(rf"[ \t]*({_NAME})")
# Starts with a newline (a literal the engine jumps to): the sign-off line itself, in the lower-cased text.
_SIGNOFF_HIT = re.compile(r"\n[ \t]*(?:best|regards|best regards|kind regards|warm regards|thanks|thank you"
                          r"|sincerely|cheers|many thanks|respectfully|signed|yours sincerely|yours truly|yours"
                          r"|best wishes|with thanks|--)[,.!]?[ \t]*\r?\n")
_SIGNOFF_NAME = re.compile(rf"[ \t]*(?:--[ \t]*\r?\n[ \t]*)?({_NAME}|[A-Z][a-z'’-]{{2,}})[ \t]*(?:\r?\n|$)")


# What `_NAME_AFTER` and `_ONE_NAME_AFTER` both start with: one test for the many colons (times in mail headers,
# URLs) that no name follows, instead of two.
_CAPITAL_AFTER = re.compile(r"[ \t]*[A-Z][a-z'’]")
_ROLE_BEFORE = re.compile(r"(?<![A-Za-z])([A-Za-z]+)[ \t]*$")
_ONE_NAME_AFTER = re.compile(r"[ \t]*([A-Z][a-z'’]+(?:-[A-Z][a-z'’]+)?)(?=[ \t]*(?:[.,;)|]|\r?\n|$))")


def _field_names(text: str):
    """Values of fields that hold a person: "Name: Ana Okafor", and any role word as a label ("Surgeon:",
    "Witness: Okafor"), where a single surname is enough if the lists know it as one."""
    pos = text.find(":")  # str.find, not a pattern: the fastest scan of a long text for one character
    while pos != -1:
        if _CAPITAL_AFTER.match(text, pos + 1):
            m = _NAME_AFTER.match(text, pos + 1)
            one = None if m else _ONE_NAME_AFTER.match(text, pos + 1)
            if m or one:  # only then is the label before the colon read
                role = _ROLE_BEFORE.search(text, max(0, pos - 24), pos)
                strength = pii_names.ROLES.get(role.group(1).lower(), 0.0) if role else 0.0
                if m and (strength >= 0.9 or _FIELD_BEFORE.search(text, max(0, pos - 24), pos)):
                    yield m.group(1)
                elif one and strength >= 0.8 and _surname_alone(one.group(1)):
                    yield one.group(1)
        pos = text.find(":", pos + 1)


# A label that says its value is a person's name, in any case and of any words: "Last name: Park", "First name:
# Will", "Employee name: will smith" (a table's cells are read as "Column: value", so its name columns too). Not
# "Name:" alone: a site's, a file's or a product's name is labelled so as often.
# Not "Customer name:", "Owner name:", "Author name:", "Operator name:": a company, a team or a bot as often.
_NAME_LABEL = re.compile(r"(?:(?:first|last|given|family|middle|maiden|full|legal|preferred|birth|patient'?s?"
                         r"|employee|staff|member|contact|person|witness|kin|guardian|nurse|doctor|physician"
                         r"|technician|engineer|inspector|soldier|officer|student|resident)[ \t_-]?name|surname"
                         r"|forename|lastname|firstname)[ \t]*:[ \t]*")
_NAME_WORD = re.compile(r"[^\W\d_]\.|[^\W\d_]+(?:['’-][^\W\d_]+)*")  # an initial, or a word of letters
_TITLE_FIRST = re.compile(r"([A-Za-z]+)\.? (?=[^\W\d_])")
_COMPANY_END = re.compile(r"(?i:\b(?:llc|inc|ltd|corp|corporation|company|co|gmbh|plc|lp|llp|group|holdings)\b\.?)"
                          r"[ \t]*(?:$|[\r\n,;])", re.M)
_VALUE_BELOW = re.compile(r"\r?\n[ \t]*(?=[^\W\d_])")
_NOT_A_NAME = frozenset("n/a na none unknown not tbd tba null nil redacted anonymous withheld same see pending "
                        "various declined refused unavailable unk auto automatic system admin service batch "
                        "bot string optional required text varchar char int integer boolean".split())


def _label_values(text: str, low: str) -> Iterator[tuple[int, int]]:
    """Spans of the values of name labels (`_NAME_LABEL`): up to four words of letters (or initials) on the
    label's line, one space apart, ending where the line, a sentence or a field does or where the next label
    begins ("Name: Ana Okafor DOB: ..."); "Last, First" too."""
    if "name" not in low:
        return
    for m in _NAME_LABEL.finditer(low):
        if m.start() and low[m.start() - 1].isalpha():
            continue  # "codename:", "filename:"
        start = end = pos = m.end()
        below = _VALUE_BELOW.match(text, start)
        if below:  # the label ends its line, as forms exported to text write it: the value is the next line
            start = end = pos = below.end()
        lead = low[start:start + 12].split(None, 1)
        if lead and lead[0].rstrip(".,;") in _NOT_A_NAME:
            continue
        title = _TITLE_FIRST.match(text, start)
        if title and title.group(1).lower() in pii_names.TITLES:
            start = end = pos = title.end()  # "Patient Name: Dr. Ana Smith": the name is what follows the title
        words = commas = 0
        while words < 4:
            w = _NAME_WORD.match(text, pos)
            if not w:
                break
            e = w.end()
            nxt = text[e:e + 1]
            if nxt and (nxt.isalnum() or nxt in "/@_\\:") or text.startswith(" :", e):
                break  # "N/A", "4W", "jdoe@site"; or the next label: "Name: Ana Okafor DOB: ..."
            end, words = e, words + 1
            if text.startswith(", ", e) and words == 1 and not commas and not _NAME_LABEL.match(low, e + 2) \
                    and not low.startswith(("last name", "first name"), e + 2):
                commas, pos = 1, e + 2  # "Okonkwo, Margaret"; not "First name: Will, Last name: Smith"
            elif nxt == " " and not text.startswith("  ", e):
                pos = e + 1
            else:
                break  # the line, the sentence ("Okonkwo. Later ...") or the field ("de Vries; Unit: 4W") ends
        if words and _COMPANY_END.search(text, start, min(end + 8, len(text))):
            continue  # "Legal name: Acme Medical Supplies LLC": a company's
        if words and (not below or end == len(text) or text[end] in "\r\n"):
            yield start, end  # below the label, the value is its line, whole: not a sentence that starts there


def _surname_alone(w: str) -> bool:
    """A word that is a surname by itself: listed and no ordinary word, or in no list and no word at all."""
    sc = pii_names.scorer()
    lw = w.lower()
    return sc.surname(lw) >= 0.6 and not sc.is_word(lw) and lw not in pii_names.NOT_NAMES


def _signoff_names(text: str, low: str):
    for hit in _SIGNOFF_HIT.finditer("\n" + low):  # the newline in front: a sign-off on the first line
        m = _SIGNOFF_NAME.match(text, hit.end() - 1)
        if m:
            yield m.group(1)


def _person_spans(text: str, low: str, names: dict[str, tuple[str, float]], free=None):
    """Every whole-word occurrence of the known names (in any of the cases `names` holds), longest first, in
    one scan of the lower-cased text: one search per name, whatever the cases it is looked for in."""
    if len(low) != len(text):  # a rare letter whose lower case is longer ("İ"): search the text itself
        low, names_low = text, {n: n for n in names if len(n) >= 3}
    else:
        names_low = {n.lower(): n for n in names if len(n) >= 3}
    usable = sorted(names_low, key=len, reverse=True)
    if len(usable) > 16 and len(usable) * len(low) > 1_000_000:
        # many names in a long text: one compiled scan beats a find loop per name (compiling costs ~0.5 ms;
        # a find over a short text well under a microsecond)
        spans = [(m.start(), m.end()) for m in re.compile("|".join(map(re.escape, usable))).finditer(low)]
    else:  # a few names (the usual mail or record): compiling a pattern would cost more than the search
        spans = []
        for n in usable:
            i = low.find(n)
            while i != -1:
                spans.append((i, i + len(n)))
                i = low.find(n, i + len(n))
    for start, end in spans:
        if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            if free is not None and not free(start, end):
                continue  # within a finding kept already (the name where it was first found): nothing to judge
            hit = names.get(text[start:end])
            if hit is None:
                continue  # a case the name is not looked for in ("HOPE" for "Hope")
            detector, score = hit
            if detector == "name-repeat" and pii_names.eponym_follows(text, end, " " in text[start:end]):
                continue  # "Foley catheter" after "Dr. Foley": the thing, not the person
            yield start, end, detector, score


_NAME_BEFORE_ADDRESS = re.compile(rf"({_NAME})\s*[<(]\s*$")


def _names_from_emails(text: str, emails: list[Finding]) -> set[str]:
    """'Jane Doe <jane@x>' and 'jane.doe@x' both tell us 'Jane Doe' is a person."""
    found = set()
    for f in emails:
        window = text[max(0, f.start - 60):f.start]  # all the pattern reads: mail repeats its headers
        name = _BEFORE_ADDRESS_SEEN.get(window)
        if name is None:
            m = _NAME_BEFORE_ADDRESS.search(window)
            name = _remember(_BEFORE_ADDRESS_SEEN, window, m.group(1) if m else "")
        if name:
            found.add(name)
        full = _ADDRESS_NAME.get(f.value)
        if full is None:
            parts = re.split(r"[._-]", f.value.split("@")[0])
            full = " ".join(p.capitalize() for p in parts) \
                if len(parts) == 2 and all(p.isalpha() and len(p) > 1 for p in parts) else ""
            _remember(_ADDRESS_NAME, f.value, full)
        if full and full in text:
            found.add(full)
    return found


_BEFORE_ADDRESS_SEEN: dict[str, str] = {}  # the 60 characters before an address -> the name there, or ""
_ADDRESS_NAME: dict[str, str] = {}  # an address -> the name its local part spells ("jane.doe" -> "Jane Doe"), or ""


def _remember(cache: dict, key, value):
    if len(cache) > 50000:
        cache.clear()
    cache[key] = value
    return value


def _plausible(name: str) -> bool:
    """Not a job title or an ordinary phrase: "Endoscopy Nurse Manager" is no name, "Ana Okafor" is."""
    out = _PLAUSIBLE.get(name)
    if out is None:
        out = _remember(_PLAUSIBLE, name, _plausible_words(name))
    return out


_PLAUSIBLE: dict[str, bool] = {}


def _plausible_words(name: str) -> bool:
    sc = pii_names.scorer()
    words = [w.lower() for w in name.split() if len(w.rstrip(".")) > 1]
    return any(sc.given(w) > 0 or sc.surname(w) > 0 for w in words) and not any(
        w in pii_names.ROLES or w in pii_names.NOT_PERSON_AFTER for w in words)


def _names(text: str, low: str, hints: tuple[str, ...], emails: list[Finding], runs: list,
           labelled: list[str] = ()) -> dict:
    """Every name to look for in the text, with the rule that found it and its confidence. A name label's value
    is looked for again only when it is no ordinary word ("First name: Will" is not every "Will")."""
    found: dict[str, tuple[str, float]] = {}
    for c in runs:  # weakest first: a stronger rule below overwrites
        for w in pii_names.repeat_words([c]):
            found.setdefault(w, ("name-repeat", c.score))
        if len(c.parts) > 1:  # the whole name too, which the search prefers: "Nguyen Thi Lan" ("Lan" is a word)
            whole = text[c.start:c.end]
            if "\n" not in whole:
                found.setdefault(whole, ("name-repeat", c.score))
    for n in labelled:
        for w in n.replace(",", " ").split():
            if len(w) >= 3 and not pii_names.scorer().is_word(w.lower()) and w.lower() not in pii_names.NOT_NAMES:
                found.setdefault(w, ("name-label", 0.9))
    accepted = {text[c.start:c.end] for c in runs}
    for n in _field_names(text):
        if n in accepted or _plausible(n):
            found[n] = ("field", 0.9)
    if "\n" in text:
        found.update((n, ("signoff", 0.8)) for n in _signoff_names(text, low) if _plausible(n))
    if emails:  # most texts (table cells, paths, titles) have neither: no generators set up for them
        found.update((n, ("mail", 0.95)) for n in _names_from_emails(text, emails))
    if hints:
        found.update((h.strip(), ("hint", 1.0)) for h in hints if h and h.strip())
    return _cased(found)


def _cased(found: dict[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """Each name also in lower case ("okafor" in a handover after "Ana Okafor"), unless that is an ordinary
    word; the form as found keeps its own rule."""
    out = dict(found)
    for n, rule in found.items():
        low = _LOWER_FORM.get(n)
        if low is None:
            if len(_LOWER_FORM) > 65536:
                _LOWER_FORM.clear()
            low = _LOWER_FORM[n] = _lower_form(n)
        if low:
            out.setdefault(low, rule)
    return out


_LOWER_FORM: dict[str, str] = {}  # name -> its lower-case form to look for too, "" for none


def _lower_form(name: str) -> str:
    sc = pii_names.scorer()
    words = name.lower().split()
    if len(name) < 3 or any(sc.is_word(w) or w in pii_names.AMBIGUOUS_FIRST for w in words):
        return ""
    return name.lower()


# --- the whole scan ------------------------------------------------------------------------------
_keyed = pii_safe_harbor._keyed
_sh = pii_safe_harbor
# (detector, the types it yields, what the text must hold for it to run). Order is priority: on overlap the
# earlier detector keeps the span. The needs are checked once per text, so a short table cell pays only for
# the detectors that can fire on it.
_ANY, _AT, _DIGIT, _REGION, _KEYWORD, _COLONS = range(6)
_DETECTORS = (
    (pii_hl7.hl7, {"PERSON", "MRN", "DOB", "DATE", "ADDRESS", "ZIP", "PHONE", "ACCOUNT", "SSN", "LICENSE"}, _DIGIT),
    (_emails, {"EMAIL"}, _AT), (_sh.urls, {"URL"}, _ANY), (_ibans, {"IBAN"}, _REGION),
    (_cards, {"CARD"}, _REGION), (_ssns, {"SSN"}, _REGION), (_sh.dod_ids, {"DODID"}, _KEYWORD),
    (_ipv6s, {"IPV6"}, _COLONS), (_ipv4s, {"IPV4"}, _REGION), (_contextual, {"DOB", "MRN", "PASSPORT"}, _KEYWORD),
    (_sh.person_dates, {"DATE", "AGE"}, _DIGIT), (_sh.ages_in_words, {"AGE"}, _ANY), (_sh.faxes, {"FAX"}, _KEYWORD),
    (_sh.labelled_ids, {"ACCOUNT", "LICENSE", "DEVICE", "VEHICLE"}, _DIGIT), (_phones, {"PHONE"}, _REGION),
    (_sh.addresses, {"ADDRESS", "ZIP"}, _DIGIT),
)
_ALL = frozenset(TYPES)


_A_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    if len(text) < 4096:
        return _A_DIGIT.search(text) is not None
    return any(d in text for d in "0123456789")  # ten memchr scans: far faster than a regex over long text


def _needs(text: str, low: str, scan: pii_safe_harbor.Scan, digits: bool) -> list[bool]:
    return [True, "@" in text, digits, bool(scan), digits and scan.any_hits(),
            text.find(":", text.find(":") + 1) > 0]  # two colons at least; stops at the second


def detect(text: str, name_hints: tuple[str, ...] = (), types: Iterable[str] | None = None) -> list[Finding]:
    """Non-overlapping findings in text order; with `types`, only those types are reported (a value of a
    type left out still keeps its span, so it is not reported as some other type)."""
    on = _ALL if types is None else frozenset(types)
    low = text.lower()
    digits = _has_digit(text)
    shape = pii_safe_harbor.digit_shapes(text) if digits else None
    windows, most_digits, dotted = _regions(text, shape) if digits else ([], 0, False)
    scan = pii_safe_harbor.Scan(text, low, windows, shape, most_digits, dotted)
    needs = _needs(text, low, scan, digits)
    taken = _Spans()
    for det, _kinds, need in _DETECTORS:  # all of them, whatever `types`: a fax number left in stays a fax
        if needs[need]:
            for f in det(text, low, scan):
                taken.add(f)
    if "PERSON" in on:
        labelled = []
        if needs[_COLONS] or ":" in text:
            for start, end in _label_values(text, low):
                taken.add(Finding("PERSON", start, end, text[start:end], "name-label", 0.95))
                labelled.append(text[start:end])
        runs = pii_names.find_names(text, low)
        for c in sorted(runs, key=lambda c: (c.start, -c.end)):
            taken.add(Finding("PERSON", c.start, c.end, text[c.start:c.end], c.detector, round(c.score, 2)))
        names = _names(text, low, name_hints, [f for f in taken.findings if f.type == "EMAIL"], runs, labelled)
        if names:  # most occurrences lie in a span taken already (the name as first found): no Finding made for those
            for start, end, detector, score in _person_spans(text, low, names, taken.free):
                if taken.free(start, end):
                    taken.add(Finding("PERSON", start, end, text[start:end], detector, score))
    if on is _ALL:
        return taken.findings
    return [f for f in taken.findings if f.type in on]


class _Spans:
    """Non-overlapping findings kept in start order; the first to claim a span keeps it."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.findings: list[Finding] = []

    def free(self, start: int, end: int) -> bool:
        """Whether no finding kept overlaps [start, end)."""
        i = bisect.bisect_right(self.starts, start)
        return not (i and self.findings[i - 1].end > start or i < len(self.findings) and self.findings[i].start < end)

    def add(self, f: Finding) -> None:
        i = bisect.bisect_right(self.starts, f.start)
        if i and self.findings[i - 1].end > f.start:
            return
        if i < len(self.findings) and self.findings[i].start < f.end:
            return
        self.starts.insert(i, f.start)
        self.findings.insert(i, f)


def _surname(name: str) -> str:
    """The surname of a name as written ("Ana Okafor", "Okafor, Ana", "OKAFOR", "Okafor's"), lower case."""
    name = name.split(",")[0] if "," in name else name.split()[-1] if name.split() else name
    return re.sub(r"['’]s$", "", name.strip().lower())


def _normal(f: Finding) -> str:
    if f.type in ("EMAIL", "PERSON", "IPV6", "PASSPORT", "MRN", "URL"):
        return f.value.lower().replace(" ", "")
    if f.type in ("PHONE", "CARD", "SSN", "FAX", "DODID"):
        return "".join(c for c in f.value if c.isdigit())
    return f.value.replace(" ", "")


CELL_CACHE = 16384  # table cells whose findings a scrubber remembers (a few MB at most)


def column_label(column: str) -> str:
    """The context a cell of `column` is read in: "Date of birth: " for date_of_birth, "Birth date: " for
    birthDate. A column that holds a person's name without saying "name" ("family", "given", "lname",
    "signed_by", a FHIR name's "text") is read as a name label's; an identifier's value as a patient's ID."""
    words = _CAMEL_HUMP.sub(" ", column).replace("_", " ").replace("-", " ").replace(".", " ").split()
    low = [w.lower() for w in words]
    if "".join(low) in _NAME_COLUMNS or len(low) == 2 and low[1] == "by" and low[0] in _BY_NAME \
            or len(low) == 2 and low[0] in _PEOPLE_PARENTS and low[1] in ("text", "display", "family", "given"):
        return "Person name: "
    if low in (["identifier"], ["identifier", "value"]):
        return "Patient ID: "
    return f"{' '.join(words).capitalize() or 'Value'}: "


_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")  # "birthDate", "postalCode"
_NAME_COLUMNS = frozenset("""family given fname lname forename forenames surname firstname lastname middlename
givenname familyname first last middle maiden prescriber attending signer""".split())
_BY_NAME = frozenset("""signed reviewed approved checked witnessed performed reported seen entered ordered verified
collected administered prescribed dispensed completed authored assigned""".split())
# A record's field that holds a person (FHIR's Patient.name, Observation.subject, performer): its "text" or
# "display" is the person's name
_PEOPLE_PARENTS = frozenset("name patient subject performer practitioner requester recorder attester".split())


# A column that holds people by name: its lower-case cells are read too ("jane doe").
_PERSON_COLUMN = re.compile(r"name|patient|owner|person|contact|author|employee|staff|nurse|doctor|physician"
                            r"|engineer|technician|operator|inspector|witness|signed|reviewer|customer|client")


# --- the site's policy ---------------------------------------------------------------------------
POLICY_FILE = "pii-policy.toml"


@dataclass(frozen=True)
class Policy:
    """Which PII types a site scrubs. Every type is on unless `keep` names it."""

    keep: frozenset[str] = frozenset()
    """Types left in the text (not detected, not counted): e.g. {"URL", "DEVICE"} for maintenance logs."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keep) - set(TYPES))
        if unknown:
            raise ValueError(f"unknown PII type(s) {', '.join(unknown)} in keep; the types are {', '.join(TYPES)}")
        object.__setattr__(self, "keep", frozenset(self.keep))

    @property
    def types(self) -> tuple[str, ...]:
        """The types scrubbed, in `TYPES` order (what `Scrubber(types=)` and `detect(types=)` take)."""
        return tuple(t for t in TYPES if t not in self.keep)

    @classmethod
    def only(cls, types: Iterable[str]) -> Policy:
        """A policy that scrubs exactly `types`."""
        want = set(types)
        unknown = sorted(want - set(TYPES))
        if unknown:
            raise ValueError(f"unknown PII type(s) {', '.join(unknown)}; the types are {', '.join(TYPES)}")
        return cls(frozenset(TYPES) - want)

    def to_toml(self) -> str:
        keep = ", ".join(f'"{t}"' for t in TYPES if t in self.keep)
        return f"# PII types left in the text; every other type is scrubbed\nkeep = [{keep}]\n"


def load_policy(path: Path) -> Policy:
    """The policy in a TOML file (`keep = ["URL", ...]`); a missing file means every type on."""
    if not path.exists():
        return Policy()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"PII policy {path}: {e}") from None
    extra = sorted(set(raw) - {"keep"})
    keep = raw.get("keep", [])
    if extra or not isinstance(keep, list) or not all(isinstance(t, str) for t in keep):
        raise ValueError(f"PII policy {path}: expected only keep = [\"TYPE\", ...]"
                         + (f", not {', '.join(extra)}" if extra else ""))
    try:
        return Policy(frozenset(t.upper() for t in keep))
    except ValueError as e:
        raise ValueError(f"PII policy {path}: {e}") from None


def site_policy(home_root: Path) -> Policy:
    """The site's policy: `HOME/pii-policy.toml`, or every type on when the file is absent."""
    return load_policy(Path(home_root) / POLICY_FILE)


# --- surrogate names (pseudonymize) ----------------------------------------------------------------
_ASCII_LOWER = "abcdefghijklmnopqrstuvwxyz"
_POOLS: list = []


def _surrogate_pools() -> dict[str, list[str]]:
    """The names surrogates are drawn from, by initial: the listed given names and the 20,000 most common surnames
    that ship with the appliance, letters only and no ordinary word, in a fixed order."""
    if not _POOLS:
        sc = pii_names.scorer()
        given = {n for n in sc.n.first if n.isascii() and n.isalpha() and len(n) >= 3 and not sc.is_word(n)
                 and n not in pii_names.AMBIGUOUS_FIRST}
        surnames = {n for n, rank in sc.n.last_rank.items() if rank < 20000 and n.isascii() and n.isalpha()
                    and len(n) >= 3 and not sc.is_word(n)}
        by_letter: dict[str, list[str]] = {}
        for n in sorted(given | surnames):
            by_letter.setdefault(n[0], []).append(n)
        _POOLS.append(by_letter)
    return _POOLS[0]


def _name_kinds(name: str, words: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each word of a name: "initial" ("A.", "J"), "particle" ("de", "van der", "DE" inside
    a name in capitals) or "word"."""
    out, pos = [], 0
    for k, w in enumerate(words):
        i = name.index(w, pos)
        pos = i + len(w)
        if len(w.rstrip(".")) == 1:
            kind = "initial"
        elif w.lower() in pii_names.PARTICLES and (w.islower() or 0 < k < len(words) - 1):
            kind = "particle"
        else:
            kind = "word"
        out.append((i, pos, kind))
    return out


def _name_key(word: str) -> str:
    """What a name word maps by: lower case, one apostrophe, no possessive ("O’Neil" is "o'neil", "Okonkwo's" is
    "okonkwo")."""
    key = word.lower().replace("’", "'")
    return key[:-2] if key.endswith("'s") and len(key) > 3 else key


def _in_case_of(fake: str, like: str) -> str:
    """`fake` written in the case of `like`: upper, lower or capitalized."""
    if like.isupper() and len(like.rstrip(".")) > 1:
        return fake.upper()
    if like.islower():
        return fake.lower()
    return fake


class Scrubber:
    """Applies one mode to text; pseudonyms are HMAC-keyed so the same value maps to the same token.

    `types` (a `Policy`, or the type names to scrub) limits what is scrubbed; by default every type."""

    def __init__(self, mode: str, key: bytes | None = None, types: Policy | Iterable[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown PII mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "pseudonymize" and not key:
            raise ValueError("pseudonymize needs a key")
        self.mode = mode
        self.key = key or b""
        if isinstance(types, Policy):
            types = types.types
        elif types is not None:
            types = Policy.only(types).types
        self.types: tuple[str, ...] | None = None if types is None or set(types) == _ALL else tuple(types)
        self._cells: dict[tuple[str, str], list[Finding]] = {}
        self._labels: dict[str, str] = {}  # column -> "Column name: ", the context a cell is read in
        self._letters: dict[str, str] | None = None  # pseudonymize: the keyed permutation of initials

    def token(self, f: Finding) -> str:
        if self.mode == "redact":
            return f"[{f.type}]"
        if f.type == "PERSON":
            fake = self.surrogate(f.value)
            if fake:
                return fake
        digest = hmac.new(self.key, f"{f.type}:{_normal(f)}".encode(), hashlib.sha256).hexdigest()[:10]
        return f"[{f.type}_{digest}]"

    def surrogate(self, name: str) -> str:
        """A person's name in pseudonymize mode: a fake name, made a word at a time, so one person keeps one
        surrogate in every form the text names them ("Margaret Okonkwo", "Okonkwo", "M. Okonkwo", "Okonkwo,
        Margaret", "MARGARET OKONKWO" become "Qiana Rucks", "Rucks", "Q. Rucks", "Rucks, Qiana", "QIANA RUCKS").
        Each word maps through an HMAC under the vault's pseudonym key onto the shipped name lists, among the
        names that start with its initial's surrogate; an initial maps through a keyed permutation of the
        letters, so "M." and "Margaret" agree, whatever role a word plays. A particle is left out ("de Vries"
        and "Vries" are one surname), a possessive kept ("Okonkwo's"). "" when nothing in `name` is a word."""
        words = _NAME_WORD.findall(name)
        if not words:
            return ""
        out = name
        for (start, end, kind), w in reversed(list(zip(_name_kinds(name, words), words))):
            if kind == "particle":  # left out, with the blank after it
                out = out[:start] + out[end:].lstrip(" ")
                continue
            fake = self._letter(w[0].lower()).upper() + ("." if w.endswith(".") else "") if kind == "initial" \
                else self._fake_word(w)
            out = out[:start] + fake + out[end:]
        return out.strip()

    def _fake_word(self, written: str) -> str:
        key = _name_key(written)
        pool = _surrogate_pools().get(self._letter(key[:1])) or [n for p in _surrogate_pools().values() for n in p]
        i = int.from_bytes(hmac.new(self.key, f"name:{key}".encode(), hashlib.sha256).digest()[:8], "big")
        fake = pool[i % len(pool)]
        if fake == key:  # never the name itself
            fake = pool[(i + 1) % len(pool)]
        tail = written[len(key):] if key != written.lower().replace("’", "'") else ""  # "'s"
        return _in_case_of(fake.capitalize(), written) + tail

    def _letter(self, c: str) -> str:
        """The initial a given name starting with `c` gets: a permutation of a-z keyed by the pseudonym key."""
        if self._letters is None:
            order = sorted(_ASCII_LOWER, key=lambda x: hmac.new(self.key, f"letter:{x}".encode(),
                                                                 hashlib.sha256).digest())
            self._letters = dict(zip(_ASCII_LOWER, order))
        if c in self._letters:
            return self._letters[c]
        i = int.from_bytes(hmac.new(self.key, f"letter:{c}".encode(), hashlib.sha256).digest()[:2], "big")
        return _ASCII_LOWER[i % 26]  # a letter beyond a-z ("Ł")

    def label(self, column: str) -> str:
        """The context a cell of `column` is read in (`column_label`), remembered."""
        prefix = self._labels.get(column)
        if prefix is None:
            prefix = self._labels[column] = column_label(column)
        return prefix

    def scrub_cell(self, column: str, value: str) -> tuple[str, Counter]:
        """Scrub one table cell with its column name as context ("ssn", "date_of_birth", "owner").

        Columns repeat their values ("high", "pass", a site's system names), so the findings of the most
        recent few thousand cells are remembered (their placeholders still go through `token`); a short cell
        with no digit, capital or "@" is plain text unless its column names a person."""
        prefix = self.label(column)
        key = (prefix, value)
        found = self._cells.get(key)
        if found is None:
            if len(value) < 64 and value.islower() and "@" not in value and not _has_digit(value) \
                    and not _PERSON_COLUMN.search(prefix.lower()):
                found = []
            else:
                found = detect(prefix + value, (), self.types)
            if len(self._cells) >= CELL_CACHE:  # the oldest goes (dicts keep insertion order): no cliff where a
                del self._cells[next(iter(self._cells))]  # table's distinct values outnumber the cache
            self._cells[key] = found
        if self.mode == "off" or not found:
            return value, Counter()
        out, counts = self._apply(prefix + value, found)
        return (out[len(prefix):] if out.startswith(prefix) else out), counts

    def findings(self, text: str, name_hints: tuple[str, ...] = ()) -> list[Finding]:
        """What `scrub` would replace, under this scrubber's types."""
        return detect(text, name_hints, self.types)

    def scrub(self, text: str, name_hints: tuple[str, ...] = ()) -> tuple[str, Counter]:
        """(scrubbed text, counts per type). 'flag' counts but keeps the text; 'off' does nothing."""
        if self.mode == "off":
            return text, Counter()
        return self._apply(text, detect(text, name_hints, self.types))

    def _apply(self, text: str, found: list[Finding]) -> tuple[str, Counter]:
        if not found:
            return text, Counter()
        counts = Counter([f.type for f in found])
        if self.mode == "flag":
            return text, counts
        people = self._date_people(found) if self.mode == "pseudonymize" else {}
        out, pos = [], 0
        for i, f in enumerate(found):
            out.append(text[pos:f.start])
            out.append(self.replacement(f, people.get(i, "")))
            pos = f.end
        out.append(text[pos:])
        return "".join(out), counts

    def replacement(self, f: Finding, person: str = "") -> str:
        """What stands in the text for `f`: its placeholder (`token`), or, in pseudonymize mode, a date tied to
        `person` shifted by that person's offset (`date_shift`), so intervals between a person's dates hold."""
        if person and f.type == "DATE" and self.mode == "pseudonymize":
            shifted = pii_safe_harbor.shift_date(f.value, self.date_shift(person))
            if shifted:
                return shifted
        return self.token(f)

    def date_shift(self, person: str) -> int:
        """Days (±1..365) by which the dates of `person` (a surname, lower case) move: keyed by the vault's
        pseudonym key, so the same person moves by the same days in every record and every version."""
        n = int.from_bytes(hmac.new(self.key, f"date-shift:{person}".encode(), hashlib.sha256).digest()[:4], "big")
        days = n % 730 - 365
        return days if days < 0 else days + 1

    @staticmethod
    def _date_people(found: list[Finding]) -> dict[int, str]:
        """For each DATE finding (by index), the person it belongs to: the nearest name before it in the same
        text, else the first after it; by surname, so "Ana Okafor" and "Okafor" are one person."""
        out: dict[int, str] = {}
        last = ""
        for i, f in enumerate(found):
            if f.type == "PERSON":
                last = _surname(f.value)
            elif f.type == "DATE":
                out[i] = last or next((_surname(g.value) for g in found[i + 1:] if g.type == "PERSON"), "")
        return out
