"""Names of people in prose, the other Safe Harbor identifiers, and the site's per-type policy (issue 20)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from appliance.vault.pii import TYPES, Finding, Policy, Scrubber, detect, load_policy, site_policy
from appliance.vault.pii_names import DATA
from tests.pii_corpus import build, score

ROOT = Path(__file__).resolve().parents[1]


def persons(text: str) -> list[str]:
    return [f.value for f in detect(text) if f.type == "PERSON"]


def redact(text: str, **kw) -> str:
    return Scrubber("redact", **kw).scrub(text)[0]


def test_the_issue_examples():
    out = redact("Patient Ana Okafor (MRN: 48213377, DOB: 03/14/1961) was seen on the ward.")
    assert out == "Patient [PERSON] (MRN: [MRN], DOB: [DOB]) was seen on the ward."
    assert persons("The scope was reprocessed for patient Margaret Okonkwo.") == ["Margaret Okonkwo"]
    assert persons("Blood was drawn from source patient Derek Hollis after the needle-stick.") == ["Derek Hollis"]
    # job titles are not people
    for title in ("Endoscopy Nurse Manager", "Senior Biomedical Engineer"):
        text = f"Approved by: {title}. Reviewed by the {title} on the ward."
        assert redact(text) == text, title


def test_words_that_are_also_names_survive():
    text = ("Will you check the pump? May 2024 was busy. Hope the valve holds. Mark the line. Bill the ward. "
            "The Foley catheter, the Allen key and the Doppler are in the drawer. Johns Hopkins Hospital called "
            "from Boston in August; the Shift Supervisor and the Charge Nurse signed.")
    assert detect(text) == []


@pytest.mark.parametrize("text, name", [
    ("Seen by Dr. Okafor on the ward.", "Okafor"),
    ("Nurse Hollis gave the dose.", "Hollis"),
    ("Sgt. Reyes and the team", "Reyes"),
    ("Capt. Al-Haddad reported in.", "Al-Haddad"),
    ("Mrs Okafor was discharged.", "Okafor"),
    ("Witness: Okafor, Ana.", "Okafor, Ana"),
    ("Follow up with A. Okafor next week.", "A. Okafor"),
    ("Referred to Anna de Vries for review.", "Anna de Vries"),
    ("Call Derek J. Hollis back.", "Derek J. Hollis"),
    ("patient margaret okonkwo was seen", "margaret okonkwo"),
    ("PATIENT: MARGARET OKONKWO", "MARGARET OKONKWO"),
    ("Hi Darrick,\n\nthe pump is fixed.", "Darrick"),
    ("Nurse May checked the line.", "May"),
])
def test_name_forms(text, name):
    assert name in persons(text), (text, detect(text))


def test_names_in_lists_and_possessives_and_repeats():
    found = persons("Attendees: Ana Okafor, Derek Hollis and Priya Raman. Okafor's chart is on the desk.")
    assert {"Ana Okafor", "Derek Hollis", "Priya Raman"} <= set(found)
    assert found.count("Okafor") == 1  # the surname alone, once the full name was seen
    assert redact("Ana Okafor's chart") == "[PERSON]'s chart"
    # a sentence ends the name: the next sentence's first word is not part of it
    assert persons("It was signed by Derek Hollis. Frank answers were given.") == ["Derek Hollis"]


def test_findings_carry_detector_and_score():
    (f,) = [f for f in detect("Dr. Okafor") if f.type == "PERSON"]
    assert f.detector.startswith("name-") and 0 < f.score <= 1
    (e,) = detect("mail jane@example.com")
    assert e.detector == "" and e.score == 1.0  # structured types: sure of the shape
    assert Finding("EMAIL", 0, 1, "x") == Finding("EMAIL", 0, 1, "x", "", 1.0)  # old callers build it so


@pytest.mark.parametrize("text, typ, value", [
    ("She lives at 1452 Birchwood Avenue, Apt 3B, Springfield, IL 62704 with her son.", "ADDRESS",
     "1452 Birchwood Avenue, Apt 3B, Springfield, IL 62704"),
    ("Send it to the depot, ZIP code 02115.", "ZIP", "02115"),
    ("Admitted on 2024-03-02 and discharged on March 9, 2024.", "DATE", "2024-03-02"),
    ("Date of death: 12/01/2023.", "DATE", "12/01/2023"),
    ("A 93-year-old man with a fall.", "AGE", "93"),
    ("patient aged 101, frail", "AGE", "101"),
    ("Fax: (617) 555-0199 for the referral.", "FAX", "(617) 555-0199"),
    ("Health plan member ID: XJH448812.", "ACCOUNT", "XJH448812"),
    ("Insurance policy number 4471-229381 on file.", "ACCOUNT", "4471-229381"),
    ("Licence no. D1234567 checked.", "LICENSE", "D1234567"),
    ("DEA number AB1234563.", "LICENSE", "AB1234563"),
    ("VIN 1HGCM82633A004352 on the car.", "VEHICLE", "1HGCM82633A004352"),
    ("Vehicle VIN JHYHKHBF0BWGTTBTY at the gate.", "VEHICLE", "JHYHKHBF0BWGTTBTY"),  # no two digits in a row
    ("Licence plate 7KQM482 at the gate.", "VEHICLE", "7KQM482"),
    ("Pump serial number SN-448812-A replaced.", "DEVICE", "SN-448812-A"),
    ("See https://intranet.example.org/ward/7 for details.", "URL", "https://intranet.example.org/ward/7"),
    ("The log is at records.example.net/ticket?id=42.", "URL", "records.example.net/ticket?id=42"),
    ("DoD ID 1234567890 on the card.", "DODID", "1234567890"),
    ("EDIPI: 1234567890", "DODID", "1234567890"),
])
def test_safe_harbor_types(text, typ, value):
    assert (typ, value) in [(f.type, f.value) for f in detect(text)], detect(text)


@pytest.mark.parametrize("text", [
    "The meeting is in 2019, room 101, ward 7, bed 12.", "A 45-year-old man, aged 67.", "Give 90 mg at 08:00.",
    "Order 55120934 shipped; version 4.2.1; part no. 4411-2200.", "The deadline is 03/15/2025.",
    "Temperature 98.6 F at noon.", "Visit example.com for the manual.", "Batch 2231-B passed ISO 13485.",
])
def test_look_alike_numbers_are_kept(text):
    assert detect(text) == [], detect(text)


def test_per_type_switches():
    text = "Dr. Okafor, fax (617) 555-0199, see https://x.example.org/a, serial number SN-448812."
    assert redact(text) == "Dr. [PERSON], fax [FAX], see [URL], serial number [DEVICE]."
    keep = Policy(frozenset({"URL", "DEVICE"}))
    assert redact(text, types=keep) == "Dr. [PERSON], fax [FAX], see https://x.example.org/a, serial number SN-448812."
    assert redact(text, types=["PERSON"]) == "Dr. [PERSON], fax (617) 555-0199, see https://x.example.org/a, " \
                                             "serial number SN-448812."
    # a type left out keeps its value: the fax number is not reported as a phone number instead
    assert [f.type for f in detect(text, types=["PHONE"])] == []
    assert Scrubber("flag", types=["URL"]).scrub(text)[1] == {"URL": 1}
    assert set(Policy().types) == set(TYPES)


def test_policy_file(tmp_path):
    assert site_policy(tmp_path) == Policy()  # no file: every type on
    (tmp_path / "pii-policy.toml").write_text(Policy(frozenset({"URL", "DATE"})).to_toml())
    assert site_policy(tmp_path).keep == {"URL", "DATE"}
    assert tomllib.loads(Policy(frozenset({"AGE"})).to_toml()) == {"keep": ["AGE"]}
    bad = tmp_path / "bad.toml"
    for body, message in (('keep = ["NAMES"]', "unknown PII type"), ('skip = ["URL"]', "expected only keep"),
                          ("keep = [", "PII policy"), ('keep = "URL"', "expected only keep")):
        bad.write_text(body)
        with pytest.raises(ValueError, match=message) as e:
            load_policy(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown PII type"):
        Scrubber("redact", types=["EMAIL", "NAMES"])


def test_dev_split_meets_the_aims():
    """The split the rules were tuned on; the held-out split is measured by benchmarks/pii_recall.py."""
    docs = build("dev", 150)
    sc = score(docs, lambda text: [(f.type, f.start, f.end) for f in detect(text)])
    assert sc.recall("PERSON") >= 0.95 and sc.precision("PERSON") >= 0.95, (sc.recall("PERSON"), sc.precision("PERSON"))
    for t in sc.labels:
        if t != "PERSON":
            assert sc.recall(t) >= 0.99 and sc.precision(t) >= 0.95, t
    assert sc.kept_rate() >= 0.95


def test_name_lists_ship_with_the_package():
    assert DATA.exists() and DATA.stat().st_size < 1_500_000
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/names.txt.gz" in data["appliance.vault"]


def test_the_sample_clinic_notes_are_scrubbed(tmp_path):
    import random

    from appliance.samples import FIRST, LAST, _clinic

    _clinic(tmp_path, random.Random(1007))
    for note in (tmp_path / "clinic").iterdir():
        out = redact(note.read_text())
        for name in FIRST + LAST:
            assert name not in out and name.lower() not in out, (note.name, name, out)
        for kept in ("Endoscopy Nurse Manager", "Will", "Hope", "Foley", "Doppler", "Senior Biomedical Engineer"):
            assert kept in out or kept not in note.read_text(), (note.name, kept)
