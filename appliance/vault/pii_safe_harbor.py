"""The HIPAA Safe Harbor identifiers that prose carries beyond the structured ones: street addresses and ZIP
codes, dates tied to a person, ages over 89, fax numbers, health-plan and account numbers, licence and
certificate numbers, vehicle and device identifiers, URLs, and DoD ID numbers (EDIPI).

Each detector is skipped unless a cheap literal check on the lower-cased text passes: a keyword of its
context ("fax", "licen", "serial", ...) or a shape marker ("://", a digit). Values tied to a context word
are found only next to it, so an order number or a build date elsewhere in the text is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from appliance.vault.pii_base import DATE, Finding, trie_pattern


class Scan(list):
    """The numeric regions of a text (a list of windows, as the structured detectors take them) and, computed
    on first use, the context keywords found near its digits by one compiled multi-pattern prescan.

    Context-bound identifiers (a fax number, a licence, a date of admission) all hold digits and follow their
    keyword closely, so the prescan only reads the few dozen characters before each run of digits.
    `most_digits` (in one run) and `dotted` (a run holds a ".") describe the runs themselves (`pii._regions`); by
    default they rule nothing out."""

    def __init__(self, text: str, low: str, regions: list[tuple[int, int]], digits: bytes | None = None,
                 most_digits: int = 1 << 30, dotted: bool = True):
        super().__init__(regions)
        self.text, self.low, self.digits = text, low, digits  # `digit_shapes(text)`, where it has some
        self.most_digits, self.dotted = most_digits, dotted
        self._hits: dict[str, list[int]] | None = None
        self.merged: list[list[int]] | None = None  # the windows merged where they overlap, once per text

    def any_hits(self) -> bool:
        """Whether any keyword is near a digit at all."""
        if self._hits is None:
            self._hits = _prescan(self.text, self.low, self.digits)
        return bool(self._hits)

    def hits(self, family: str) -> list[int]:
        """Where keywords of `family` ("fax", "license", ...) start a word within reach of a digit."""
        if self._hits is None:
            self._hits = _prescan(self.text, self.low, self.digits)
        return self._hits.get(family, [])


_REACH = 48  # how far before a digit a keyword may start
# Runs of two digits or more (every keyed identifier holds one: "AB12 CDE"), with the runs that lie within
# reach of each other taken together, so the engine, not a Python loop, merges the windows.
_DIGIT_CLUSTER = re.compile(rf"\d\d+(?:\D{{0,{_REACH}}}\d\d+)*")
_DIGIT_CLUSTER_SHAPE = re.compile(rb"00+(?:[^0]{0,%d}00+)*" % _REACH)  # the same, in `digit_shapes`

# Digit shapes: an ASCII text with every digit written "0", the separators of numbers as they are and anything
# else "#". A pattern that starts with a digit class is tried by the regex engine at about 8 ns a character;
# one that starts with the fixed "0" at about 2, so the scans for runs of digits read these shapes (`\d` is
# [0-9] in ASCII, so they find the same places).
_DIGIT_SHAPE = bytearray(b"#" * 256)
_DIGIT_SHAPE[ord("0"):ord("9") + 1] = b"0" * 10
for _c in b" .()/+-":
    _DIGIT_SHAPE[_c] = _c
DIGIT_SHAPES = bytes(_DIGIT_SHAPE)


def digit_shapes(text: str) -> bytes | None:
    """The digit shapes of `text`, or None when it is not ASCII."""
    return text.encode("ascii").translate(DIGIT_SHAPES) if text.isascii() else None


def _prescan(text: str, low: str, digits: bytes | None = None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for d in (_DIGIT_CLUSTER.finditer(text) if digits is None else _DIGIT_CLUSTER_SHAPE.finditer(digits)):
        for m in _KEYWORDS.finditer(low, max(0, d.start() - _REACH), d.end()):
            i = m.start()
            if i and low[i - 1].isalnum():
                continue
            for family in _FAMILY_OF[m.group()]:
                out.setdefault(family, []).append(i)
    return out


def _find_all(low: str, key: str) -> Iterator[int]:
    i = low.find(key)
    while i != -1:
        yield i
        i = low.find(key, i + 1)


def _keyed(pattern: re.Pattern, text: str, scan: Scan, family: str) -> Iterator[re.Match]:
    for i in scan.hits(family):
        m = pattern.match(text, i)
        if m:
            yield m


# --- URLs ----------------------------------------------------------------------------------------
_URL = re.compile(r"(?:https?|ftp|sftp)://[^\s<>\"'`)\]}]+|(?<![\w.@/])www\.[A-Za-z0-9-]+\.[^\s<>\"'`)\]}]+")


# Starts with a literal ".": the engine jumps from full stop to full stop, which is fast.
_TLD = re.compile(r"\.(?:com|org|net|edu|gov|mil|int|io|info|biz|health|co\.uk|nhs\.uk|ac\.uk|us|eu|de|no|fr|nl"
                  r"|se|dk|ca|au)(?![a-z0-9])")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
_URL_TAIL = re.compile(r"(?::\d{1,5})?(?:[/?#][^\s<>\"'`)\]}]*)?")


def urls(text: str, low: str, _scan: Scan) -> Iterator[Finding]:
    if "://" in text or "www." in low:
        for m in _URL.finditer(text):
            yield _url(text, m.start(), m.end())
    if "." in text:
        for m in _TLD.finditer(low):
            yield from _bare_host(text, low, m.start())


def _url(text: str, start: int, end: int) -> Finding:
    while end > start and text[end - 1] in ".,;:!?":
        end -= 1
    return Finding("URL", start, end, text[start:end], "url")


def _bare_host(text: str, low: str, i: int) -> Iterator[Finding]:
    """A host name without a scheme ("intranet.example.com/ticket?id=4"), found from its top-level domain."""
    end = i + 1
    while end < len(low) and low[end].isalpha():
        end += 1
    start = i
    while start > 0 and low[start - 1] in _HOST_CHARS:
        start -= 1
    if start and low[start - 1] in "@/:_":
        return  # an e-mail address or part of a longer URL, found on its own
    host = low[start:end]
    if host.count(".") < 2 or not host[0].isalnum() or ".." in host:
        return  # "example.com" alone is too often a product or a file; a host needs a sub-domain
    m = _URL_TAIL.match(text, end)
    yield _url(text, start, m.end() if m else end)




# --- fax numbers (before phones: the same shape, a different type) ---------------------------------
_FAX = re.compile(r"(?i:fax|facsimile)(?:[ \t]*(?i:no\.?|number|#|nr\.?|line))?[ \t]*[:.#-]?[ \t]*"
                  r"(?:[A-Za-z]+[ \t]+){0,4}?(?:(?i:to|on|at|via)[ \t]+)?"
                  r"(\+?\(?\d[\d ().-]{5,18}\d)(?![\d-])")


def faxes(text: str, _low: str, scan: Scan) -> Iterator[Finding]:
    for m in _keyed(_FAX, text, scan, "fax"):
        if sum(c.isdigit() for c in m.group(1)) >= 7:
            yield Finding("FAX", m.start(1), m.end(1), m.group(1), "fax")


# --- DoD ID / EDIPI --------------------------------------------------------------------------------
_DODID = re.compile(r"(?i:edipi|dod[ \t]*id(?:[ \t]*(?:number|no\.?|#))?|dod[ \t]*identification[ \t]*number"
                    r"|cac[ \t]*(?:id|number))[ \t]*[:#=-]?[ \t]*(?:is[ \t]+)?(\d{10})(?!\d)")


def dod_ids(text: str, _low: str, scan: Scan) -> Iterator[Finding]:
    for m in _keyed(_DODID, text, scan, "dodid"):
        yield Finding("DODID", m.start(1), m.end(1), m.group(1), "dodid")


# --- identifiers that follow a label ---------------------------------------------------------------
_ID = r"((?=(?:[A-Z]{1,4}[- ])?[A-Z0-9./-]*\d)(?:[A-Z]{1,4}[- ]?)?[A-Z0-9][A-Z0-9./-]{3,22}[A-Z0-9])(?![\w-])"
_LABEL_TAIL = r"(?:[ \t]*(?i:id|no\.?|nr\.?|number|num|#|mbi)\.?)?[ \t]*[:#=-]?[ \t]*(?:is[ \t]+|of[ \t]+)?"
_ACCOUNT = re.compile(r"(?i:health[ \t]*plan(?:[ \t]*beneficiary)?|insurance(?:[ \t]*policy)?|member(?:ship)?"
                      r"|subscriber|beneficiary|policy(?:holder)?|account|acct|medicaid|medicare|group[ \t]*plan"
                      r"|claim(?=[ \t]*(?:number|no\b|#|id\b))|mbi|bcbs)"
                      + _LABEL_TAIL + _ID)
_LICENSE = re.compile(r"(?i:driver'?s[ \t]*licen[cs]e|licen[cs]e|lic(?=[ \t]*[#.:])|certificat(?:e|ion)"
                      r"|cert(?:\.|(?=[ \t]*[#:]))|dea|npi|registration|permit"
                      r"|credential)" + _LABEL_TAIL + _ID)  # "Lic# RN123456", "Cert# 44871"
_DEVICE = re.compile(r"(?i:serial(?:[ \t]*number)?|s/n|sn|device[ \t]*(?:id|identifier|serial)|imei|udi"
                     r"|asset[ \t]*tag|implant[ \t]*(?:id|serial))" + _LABEL_TAIL + _ID)
_PLATE = re.compile(r"(?i:licen[cs]e[ \t]*plate|number[ \t]*plate|plate|vehicle[ \t]*reg(?:istration)?|reg\.?"
                    r"[ \t]*(?:no\.?|number|plate)|tag)" + _LABEL_TAIL
                    + r"((?=[A-Z0-9 -]*\d)(?=[A-Z0-9 -]*[A-Z])[A-Z0-9]{1,4}[- ]?[A-Z0-9]{2,5})(?![\w-])")
_VIN = re.compile(r"(?<![A-Z0-9])(?=[A-HJ-NPR-Z0-9]{0,16}[A-HJ-NPR-Z])(?=[A-HJ-NPR-Z0-9]{0,16}\d)"
                  r"[A-HJ-NPR-Z0-9]{17}(?![A-Z0-9])")
_VIN_VALUES = {**{str(d): d for d in range(10)}, **dict(zip("ABCDEFGH", range(1, 9))),
               **dict(zip("JKLMN", range(1, 6))), "P": 7, "R": 9, **dict(zip("STUVWXYZ", range(2, 10)))}
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)

_ACCOUNT_KEYS = ("health", "insurance", "member", "subscriber", "beneficiary", "policy", "account", "acct",
                 "medicaid", "medicare", "group", "claim", "mbi", "bcbs")
_LICENSE_KEYS = ("licen", "lic#", "lic.", "lic:", "certif", "cert.", "cert:", "cert#", "dea", "npi", "registration",
                 "permit", "credential")
_DEVICE_KEYS = ("serial", "s/n", "sn", "device", "imei", "udi", "asset", "implant")
_PLATE_KEYS = ("licen", "number plate", "plate", "vehicle", "reg", "tag")
_VIN_KEYS = ("vin", "vehicle", "car ", "truck", "chassis", "van ")


def vin_ok(vin: str) -> bool:
    """The North American check digit (position 9)."""
    total = sum(_VIN_VALUES[c] * w for c, w in zip(vin, _VIN_WEIGHTS))
    return "0123456789X"[total % 11] == vin[8]


def _labelled(pattern: re.Pattern, typ: str, detector: str, text: str, scan: Scan, family: str,
              min_digits: int = 3) -> Iterator[Finding]:
    for m in _keyed(pattern, text, scan, family):
        value = m.group(1)
        if sum(c.isdigit() for c in value) >= min_digits:
            yield Finding(typ, m.start(1), m.end(1), value, detector)


_LABELLED = ((_ACCOUNT, "ACCOUNT", "account", "account", 3), (_LICENSE, "LICENSE", "license", "license", 3),
             (_DEVICE, "DEVICE", "device", "device", 3), (_PLATE, "VEHICLE", "plate", "plate", 1))


# A network card's MAC address, a device identifier wherever it stands: "00:1A:2B:3C:4D:5E", "00-1a-2b-3c-4d-5e"
# (found from its first separator, a fixed string the engine skips to fast; the two digits before it are read after)
_MACS = tuple(re.compile(rf"{sep}[0-9A-Fa-f]{{2}}(?:{sep}[0-9A-Fa-f]{{2}}){{4}}(?![\w:.-])") for sep in (":", "-"))
_HEX2 = re.compile(r"(?<![\w:.-])[0-9A-Fa-f]{2}$")
_MAC_WORD = re.compile(r"mac|hwaddr|ether|hardware address|bssid")


def labelled_ids(text: str, low: str, scan: Scan) -> Iterator[Finding]:
    """Account and health-plan, licence and certificate, device serial and vehicle numbers after their label;
    MAC addresses."""
    for sep, mac in zip(":-", _MACS):
        if sep not in text:
            continue
        for m in mac.finditer(text):
            head = _HEX2.search(text, max(0, m.start() - 3), m.start())
            if head is None:
                continue
            value = text[head.start():m.end()]
            if any(c in "abcdefABCDEF" for c in value) or _MAC_WORD.search(low, max(0, head.start() - 24), m.start()):
                yield Finding("DEVICE", head.start(), m.end(), value, "mac")  # not "time 10:11:12:13:14:15"
    for pattern, typ, detector, family, min_digits in _LABELLED:
        if scan.hits(family):  # most texts hold no label of a family: no generators set up for it
            yield from _labelled(pattern, typ, detector, text, scan, family, min_digits)
    # a VIN may hold no two digits in a row, so it is looked for after its keywords directly, not via the prescan
    if "vin" not in low and "vehicle" not in low and not scan.hits("vin"):
        return
    for i in sorted({i for k in ("vin", "vehicle") for i in _find_all(low, k)} | set(scan.hits("vin"))):
        for m in _VIN.finditer(text, i, i + 64):
            v = m.group()
            if vin_ok(v) or "vin" in low[max(0, m.start() - 24):m.start()]:
                yield Finding("VEHICLE", m.start(), m.end(), v, "vin")


# --- street addresses and ZIP codes --------------------------------------------------------------
_SUFFIXES = ("Street", "St", "Avenue", "Ave", "Road", "Rd", "Boulevard", "Blvd", "Lane", "Ln", "Drive", "Dr",
             "Court", "Ct", "Way", "Place", "Pl", "Terrace", "Ter", "Circle", "Cir", "Highway", "Hwy", "Parkway",
             "Pkwy", "Square", "Sq", "Trail", "Trl", "Crescent", "Close", "Row", "Plaza", "Loop", "Pike", "Alley",
             "Gardens", "Mews", "Walk", "Hill")
_SUFFIX = f"(?:{trie_pattern(_SUFFIXES)})"  # a trie: one branch per letter, not forty tried in turn
_STATES = trie_pattern(("AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ "
                         "NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR GU VI").split())
_CITY_ZIP = rf"(?:,?[ \t]+(?:[A-Z][a-z]+[ \t]?){{1,3}},?[ \t]+(?:{_STATES})\.?(?:[ \t]+\d{{5}}(?:-\d{{4}})?)?)?"
_ADDRESS = re.compile(rf"\d{{1,6}}[A-Z]?(?:-\d{{1,4}})?[ \t]+(?:[NSEW]\.?[ \t]+)?"
                      rf"(?:[A-Z][a-z]+\.?[ \t]+|\d{{1,3}}(?:st|nd|rd|th)[ \t]+){{1,3}}{_SUFFIX}\b\.?"
                      rf"(?:[ \t]+(?:NE|NW|SE|SW|N|S|E|W)\b\.?)?"  # "1600 Pennsylvania Ave NW"
                      rf"(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|Room|Rm|Floor|Fl|#)\.?[ \t]*#?[A-Z0-9-]{{1,6}})?"
                      + _CITY_ZIP)
# A street suffix is found first (a capital letter, then one branch of a trie: fast to scan for); only then is
# the house number looked for in the few dozen characters before it, and the whole address matched there.
_SUFFIX_AT = re.compile(_SUFFIX + r"\b")
_HOUSE = re.compile(r"\d{1,6}[A-Z]?(?:-\d{1,4})?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Z][a-z]|\d{1,3}(?:st|nd|rd|th)\b)")
_PO_BOX = re.compile(r"(?i:p\.?[ \t]?o\.?[ \t]*box|(?:rural[ \t]+route|r\.?r\.?|hc)[ \t]+\d{1,4},?[ \t]*box)"
                     r"[ \t]+\d{1,6}" + _CITY_ZIP)  # "PO Box 12", "Rural Route 2, Box 15"
_ZIP_STATE = re.compile(rf"(?:{_STATES})\.?,?[ \t]+(\d{{5}}(?:-\d{{4}})?)(?![\w-])")
_ZIP_LABEL = re.compile(r"(?i:zip(?:[ \t]*code)?|postal[ \t]*code|postcode)[ \t]*[:#]?[ \t]*"
                        r"(\d{5}(?:-\d{4})?)(?![\w-])")


def addresses(text: str, low: str, scan: Scan) -> Iterator[Finding]:
    done = 0
    for suffix in _SUFFIX_AT.finditer(text):
        if suffix.start() < done or not suffix.start() or text[suffix.start() - 1] not in " \t":
            continue
        for head in _HOUSE.finditer(text, max(done, suffix.start() - 64), suffix.start()):
            start = head.start()
            if start and (text[start - 1].isalnum() or text[start - 1] in "/.-_"):
                continue
            m = _ADDRESS.match(text, start)
            if m and m.end() >= suffix.end():
                done = m.end()
                yield Finding("ADDRESS", m.start(), m.end(), m.group(), "address")
                break
    if "box" in low:
        for m in _PO_BOX.finditer(text):
            yield Finding("ADDRESS", m.start(), m.end(), m.group(), "address")
    # a ZIP code is five digits in a row: a scan of the digit shapes for them is cheaper than one of the text
    # for state codes (capital letters, everywhere)
    for m in _ZIP_STATE.finditer(text) if scan.digits is None or b"00000" in scan.digits else ():
        if not m.start() or not (text[m.start() - 1].isalnum() or text[m.start() - 1] == "-"):
            yield Finding("ZIP", m.start(1), m.end(1), m.group(1), "zip")
    for m in _keyed(_ZIP_LABEL, text, scan, "zip"):
        yield Finding("ZIP", m.start(1), m.end(1), m.group(1), "zip")


# --- dates tied to a person, and ages over 89 ------------------------------------------------------
_EVENT = (r"(?i:admitted|admission|admit|discharged|discharge|died|death|deceased|expired|passed[ \t]+away|reported"
          r"|occurred|incident|examined|treated|attended|arrived|fell"
          r"|date[ \t]+of[ \t]+service|dos|surgery|operated|operation|procedure|delivered|delivery|injured"
          r"|injury|seen|presented|transferred|transfer|deployed|enlisted|hired|terminated|separated|visit|visited"
          r"|appointment|appt|follow-?up|performed|biopsy|biopsied|intubated|extubated|pronounced|vaccinated"
          r"|immunized|immunised|tested|collected|prescribed|onset|referred|consulted"
          r"|do[di](?=[ \t]*:))")  # "DOD:", "DOI:" as labels (date of death, of injury); not "the DoD contract"
# A date after an event that ties it to a person, and the end of a range that starts so ("deployed from
# 2023-06-01 to 2024-01-15"): both dates are the person's.
# (the event's sentence, not the next: a full stop after a word, not after an initial or a title, "Dr. ", "E. ")
_PERSON_DATE = re.compile(_EVENT + r"\b(?:(?<![a-z]{4}[.!?])[^\n;]){0,30}?(?<![\d/.-])(" + DATE + r")(?![\d/-])"
                          r"(?:[ \t]*(?:-|–|to|until|through|thru)[ \t]*(" + DATE + r")(?![\d/-]))?")
_DATE_KEYS = ("admi", "discharg", "died", "death", "deceased", "expired", "passed away", "service", "dos", "reported",
              "occurred", "incident", "examined", "treated", "attended", "arrived", "fell",
              "surgery", "operat", "procedure", "deliver", "injur", "seen", "presented", "transfer", "deployed",
              "enlisted", "hired", "terminated", "separated", "visit", "appointment", "appt", "follow", "performed",
              "biops", "intubated", "extubated", "pronounced", "vaccinated", "immuni", "tested", "collected",
              "prescribed", "onset", "referred", "consulted", "dod", "doi")
# Starts with a digit class, so the engine skips from digit to digit; a digit or a "." before it is checked after.
# An age and its unit, or (group 2) an age and sex, in one pass over the text
_AGE = re.compile(r"(9\d|1[0-4]\d)(?:(?:[ \t]*-?[ \t]*(?:years?|yrs?)(?:[ \t]*-?[ \t]*old)?|[ \t]*(?:y/?o|y\.o\.))"
                  r"(?!\w)|([ \t]?[MF])(?![\w°]))")
# Ages over 89 written as a ward list or a note's opening does: " - 91M", ", 94F", "(91M)", "a 94F"; not a
# temperature ("Temp 94F": no article or list mark before it)
# (found by `_AGE`, from its digits; what stands before them is read after)
_AGE_SEX_LEAD = re.compile(r"(?:(?<![\w])(?:a|an)[ \t]+|[-–,(][ \t]*|^[ \t]*)$", re.M)
# ... where a patient is spoken of: a bed or a patient before it on its line, a history after it (not "Temp 97-99F",
# "Memory - 92M used", "MOS: 91M, 92F")
_AGE_SEX_BEFORE = re.compile(r"(?<![a-z])(?:pt|patient|bed|rm|room|bay|resident|mr|mrs|ms|veteran|decedent)(?![a-z])"
                             r"[^\n]*$")
_AGE_SEX_NEXT = re.compile(r"(?i:[ \t]*(?:[-,][ \t]*)?(?:with|w/|c/o|s/p|h/o|presenting|presents|admitted|pmh|hx)"
                           r"(?![a-z]))")
# Ages over 89 in words, in the nineties ("ninety-two-year-old", "aged ninety-four"; a hundred and more is written
# in digits as good as always, and looking for "hundred" too would cost every text a second pass)
_UNITS = r"(?:one|two|three|four|five|six|seven|eight|nine)"
_OVER_89 = rf"ninety(?:[- ]{_UNITS})?"
_AGE_WORDS = re.compile(rf"(?i:(?<![\w-])({_OVER_89})(?=[- ]+years?[- ]+old|[- ]+y/?o\b|[- ]+yrs?\b)"
                        rf"|(?<=aged )({_OVER_89})(?![\w-]|[ \t]+(?:days?|weeks?|months?|hours?|minutes?)\b))")
# ... of a person: one named after it ("a ninety-two-year-old woman") or before it on the line ("the patient is
# ninety-four years old", "aged ninety-four"); not "the bridge is a hundred years old"
_AGE_PERSON_AFTER = re.compile(r"(?i:[- ]+years?[- ]+old[ \t]+(?:man|woman|male|female|patient|pt|gentleman|lady|"
                               r"veteran|resident|widow|widower|mother|father|grandmother|grandfather|person|"
                               r"individual|client|decedent)s?\b)")
_AGE_PERSON_BEFORE = re.compile(r"(?i:(?<![a-z])(?:pt|patient|he|she|mr|mrs|ms|resident|veteran|who|decedent|aged)"
                                r"(?![a-z]))[^\n.]*$")
_AGE_LABEL = re.compile(r"(?i:aged?)[ \t]*[:=]?[ \t]*(9\d|1[0-4]\d)(?!\d|\.\d)")


_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_ISO = re.compile(r"(\d{4})([-./])(\d{1,2})[-./](\d{1,2})")
_COMPACT = re.compile(r"(\d{4})(\d\d)(\d\d)")  # "19450312"
_DAY_MON = re.compile(r"(\d{1,2})([-]?)([A-Za-z]{3})[-]?(\d{2}|\d{4})")  # "12MAR45", "5-Mar-2024"
_NUMERIC = re.compile(r"(\d{1,2})([/.-])(\d{1,2})[/.-](\d{2,4})")
_MONTH_FIRST = re.compile(r"([A-Za-z]+)(\.?) (\d{1,2})(st|nd|rd|th)?(,?) (\d{4})")
_DAY_FIRST = re.compile(r"(\d{1,2})(st|nd|rd|th)? (of )?([A-Za-z]+)(\.?)(,?) (\d{4})")


def shift_date(value: str, days: int) -> str | None:
    """`value` (a date as `DATE` matches it) moved by `days`, written as it was ("2024-03-05", "3/5/2024",
    "March 5, 2024", "5th of Mar. 2024"); None when it is no real date. Numeric dates read month first (US)
    unless the first number cannot be a month."""
    import datetime as dt

    def move(y: int, m: int, d: int):
        try:
            return dt.date(y, m, d) + dt.timedelta(days=days)
        except (ValueError, OverflowError):  # no such day, or moved past year 1 or 9999
            return None

    def pad(new: int, old: str) -> str:
        return f"{new:0{len(old)}d}"  # "05" stays two digits, "5" one where it can

    if m := _ISO.fullmatch(value):
        new = move(int(m[1]), int(m[3]), int(m[4]))
        return new and f"{new.year:04d}{m[2]}{pad(new.month, m[3])}{m[2]}{pad(new.day, m[4])}"
    if m := _COMPACT.fullmatch(value):
        new = move(int(m[1]), int(m[2]), int(m[3]))
        return new and f"{new.year:04d}{new.month:02d}{new.day:02d}"
    if m := _DAY_MON.fullmatch(value):
        y = m[4]
        month = _month(m[3])
        new = month and move(int(y) if len(y) == 4 else 2000 + int(y) if int(y) < 50 else 1900 + int(y), month,
                             int(m[1]))
        ys = f"{new.year:04d}" if new and len(y) == 4 else f"{new.year % 100:02d}" if new else ""
        return new and f"{pad(new.day, m[1])}{m[2]}{_month_name(new.month, m[3])}{m[2]}{ys}"
    if m := _NUMERIC.fullmatch(value):
        a, sep, b, y = m[1], m[2], m[3], m[4]
        day_first = int(a) > 12
        year = int(y) if len(y) == 4 else 2000 + int(y) if int(y) < 50 else 1900 + int(y)
        new = move(year, int(b), int(a)) if day_first else move(year, int(a), int(b))
        if new is None:
            return None
        first, second = (new.day, new.month) if day_first else (new.month, new.day)
        ys = f"{new.year:04d}" if len(y) == 4 else f"{new.year % 100:02d}"
        return f"{pad(first, a)}{sep}{pad(second, b)}{sep}{ys}"
    if m := _MONTH_FIRST.fullmatch(value):
        month = _month(m[1])
        new = month and move(int(m[6]), month, int(m[3]))
        return new and (f"{_month_name(new.month, m[1])}{m[2]} {new.day}{_ordinal(new.day) if m[4] else ''}{m[5]} "
                        f"{new.year}")
    if m := _DAY_FIRST.fullmatch(value):
        month = _month(m[4])
        new = month and move(int(m[7]), month, int(m[1]))
        return new and (f"{new.day}{_ordinal(new.day) if m[2] else ''} {m[3] or ''}{_month_name(new.month, m[4])}"
                        f"{m[5]}{m[6]} {new.year}")
    return None


def _month(word: str) -> int:
    w = word.lower()
    return next((i + 1 for i, name in enumerate(_MONTHS) if len(w) >= 3 and name.startswith(w)), 0)


def _month_name(month: int, like: str) -> str:
    """Month `month` written as `like` is: in full or cut to three letters ("Sept" for September), in its case."""
    name = _MONTHS[month - 1]
    name = name if like.lower() in _MONTHS else "sept" if month == 9 and len(like) == 4 else name[:3]
    return name.upper() if like.isupper() and len(like) > 1 else name.capitalize() if like[0].isupper() else name


def _ordinal(day: int) -> str:
    return "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


# A date written without separators ("20240305", "05MAR24"): a build, batch or order number as often, so it is
# the person's only right after the event or its label ("Admitted 20240305", "Admission date: 20240305").
_COMPACT_DATE = re.compile(r"\d+(?:[A-Z]{3}\d+)?")
_EVENT_AT = re.compile(_EVENT)
_RIGHT_AFTER = re.compile(r"(?i:[ \t]*(?:date|dt|on)?[ \t]*[:=#-]?[ \t]*(?:on[ \t]+)?)")


# A date the patient follows in its sentence: "03/05/2024 - Pt c/o chest pain", "On 5 March 2024 the patient fell"
_NOT_PATIENT = (r"(?![a-z-])(?![ \t_-]*(?:portal|dashboard|module|app|api|service|ui|data|table|list|field|id|records?"
                r"|management|system|search|model|schema|view|screen|page|form|feature|flow|import|export|sync|index"
                r"|class|object|type|lift|monitor)s?\b)")
# Each starts with a fixed string, which the engine skips to fast; the letter before is checked after
_PATIENT_AFTER = (re.compile(r"patient" + _NOT_PATIENT), re.compile(r"pt" + _NOT_PATIENT))
# A signature's date: "Electronically signed by Dr. Okafor on 03/05/2024" (not "Firmware signed 2024-03-05")
_SIGNED_ON = re.compile(r"(?i:signed)[ \t]+by\b[^\n;]{0,40}?\bon[ \t]+(" + DATE + r")(?![\d/-])")
_DATE_BEFORE = re.compile(r"(?<![\d/.-])(" + DATE + r")(?![\d/-])[^\n.;:]{0,24}$")


def _dates_before_patient(text: str, low: str, scan: Scan) -> Iterator[Finding]:
    for m in (m for p in _PATIENT_AFTER for m in p.finditer(low)):
        k = m.start()
        if k and low[k - 1].isalpha():
            continue  # "except", "outpatient"
        lo = max(0, k - 48)
        if scan.digits is not None and scan.digits.find(b"00", lo, k) < 0:
            continue  # no date ends within reach (the usual case): no search
        d = _DATE_BEFORE.search(text, lo, k)
        if d:
            yield Finding("DATE", d.start(1), d.end(1), d.group(1), "date-event")


def person_dates(text: str, low: str, scan: Scan) -> Iterator[Finding]:
    if "pt" in low or "patient" in low:
        yield from _dates_before_patient(text, low, scan)
    for m in _keyed(_SIGNED_ON, text, scan, "signed"):
        yield Finding("DATE", m.start(1), m.end(1), m.group(1), "date-event")
    for m in _keyed(_PERSON_DATE, text, scan, "date"):
        if _COMPACT_DATE.fullmatch(m.group(1)):
            ev = _EVENT_AT.match(text, m.start())
            gap = _RIGHT_AFTER.match(text, ev.end()) if ev else None
            if not gap or gap.end() != m.start(1):
                continue  # "seen in clinic, build 20240115"
        yield Finding("DATE", m.start(1), m.end(1), m.group(1), "date-event")
        if m.group(2):
            yield Finding("DATE", m.start(2), m.end(2), m.group(2), "date-event")
    for m in _AGE.finditer(text):
        i = m.start()
        if i and (text[i - 1].isdigit() or text[i - 1] == "."):
            continue
        if m.group(2) and not (_AGE_SEX_LEAD.search(text, max(0, i - 8), i) and (
                _AGE_SEX_NEXT.match(text, m.end()) or _AGE_SEX_BEFORE.search(low, max(0, i - 32), i))):
            continue  # " - 91M" where a patient is spoken of; not "Temp 97-99F", "Memory - 92M"
        yield Finding("AGE", m.start(1), m.end(1), m.group(1), "age")
    for m in _keyed(_AGE_LABEL, text, scan, "age"):
        yield Finding("AGE", m.start(1), m.end(1), m.group(1), "age")


def ages_in_words(text: str, low: str, _scan: Scan) -> Iterator[Finding]:
    """Ages over 89 written in words ("a ninety-two-year-old man"), in a text with no digit too."""
    if "ninety" in low:
        for m in _AGE_WORDS.finditer(text):
            g = 1 if m.group(1) else 2
            if _AGE_PERSON_AFTER.match(text, m.end(g)) or _AGE_PERSON_BEFORE.search(text, max(0, m.start() - 40),
                                                                                    m.start() + (g == 2)):
                yield Finding("AGE", m.start(g), m.end(g), m.group(g), "age")


# Every keyword of the prescan, by the family of detectors it wakes.
KEYWORDS = {
    "dob": ("date of birth", "d.o.b", "dob", "birth", "born"),
    "mrn": ("mrn", "medical record", "patient", "chart", "med rec", "medrec", "med. rec", "hospital", "ur ", "visit",
            "encounter", "fin"),
    "passport": ("passport",),
    "date": _DATE_KEYS,
    "signed": ("signed",),
    "age": ("age", "aged"),
    "fax": ("fax", "facsimile"),
    "dodid": ("edipi", "dod", "cac"),
    "zip": ("zip", "postal", "postcode"),
    "account": _ACCOUNT_KEYS, "license": _LICENSE_KEYS, "device": _DEVICE_KEYS, "plate": _PLATE_KEYS,
    "vin": _VIN_KEYS,
}
_FAMILY_OF: dict[str, list[str]] = {}
for _family, _keys in KEYWORDS.items():
    for _k in _keys:
        _FAMILY_OF.setdefault(_k, []).append(_family)
# A trie, and only at the start of a word: far fewer places for the engine to try than every letter.
_KEYWORDS = re.compile(rf"(?<![a-z0-9])(?:{trie_pattern(_FAMILY_OF)})")
