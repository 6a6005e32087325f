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


@pytest.mark.parametrize("role", ["The patient", "Pt", "Nurse", "pt"])
def test_verbs_after_a_role_are_no_names(role):
    # the inflected words that are rare surnames too ("Has", "States", "Falls") are verbs far more often
    for verb in ("has", "states", "takes", "walks", "falls", "stands", "sees", "waits", "hopes", "needs", "goes"):
        text = f"{role} {verb} the plan."
        assert persons(text) == [], text
    assert persons(f"{role} Rogers took the call.") == ["Rogers"]  # a frequent surname that is a plural too


def test_a_given_name_after_a_surname_in_capitals_is_no_word_or_credential():
    assert persons("PATIENT: OKAFOR, WARD 4") == ["OKAFOR"]
    assert persons("PATIENT: SMITH, CHEMO") == ["SMITH"] and persons("PATIENT: DOE, HYPOKALEMIA") == ["DOE"]
    assert persons("NURSE: HOLLIS, RN") == ["HOLLIS"]
    assert persons("PATIENT: OKAFOR, STABLE") == ["OKAFOR"]


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
    # a two-word role after a word longer than the pair rule reaches ("reviewed", "escalated")
    ("Note reviewed by Whitfield on the ward.", "Whitfield"),
    ("Findings escalated to Whitfield.", "Whitfield"),
    ("The case was discussed with Whitfield today.", "Whitfield"),
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
    ("Age: 93.", "AGE", "93"),  # a full stop after an age ends the sentence
    ("D.O.B. 4/12/30", "DOB", "4/12/30"),
    ("DOD: 4/12/2024", "DATE", "4/12/2024"),
    ("Pronounced dead at 14:02 on 12/04/2024.", "DATE", "12/04/2024"),
    ("Follow-up appointment on 04/01/2024.", "DATE", "04/01/2024"),
    ("MRI performed 03/08/2024; biopsy on 2024-03-06.", "DATE", "2024-03-06"),
    ("Deployed from 2023-06-01 to 2024-01-15.", "DATE", "2024-01-15"),  # a range's end is the person's too
    ("Admitted 5-Mar-2024 via ED.", "DATE", "5-Mar-2024"),
    ("Lives at 1600 Pennsylvania Ave NW, Washington, DC 20500.", "ADDRESS",
     "1600 Pennsylvania Ave NW, Washington, DC 20500"),  # a direction after the street
    ("Mail to Rural Route 2, Box 15, Ames, IA.", "ADDRESS", "Rural Route 2, Box 15, Ames, IA."),
    ("Lic# RN123456 on file.", "LICENSE", "RN123456"),
    ("Medicare MBI: 1EG4-TE5-MK72", "ACCOUNT", "1EG4-TE5-MK72"),
    ("Pump MAC 00:1A:2B:3C:4D:5E on VLAN 12", "DEVICE", "00:1A:2B:3C:4D:5E"),
    # dates the patient follows in the sentence, signatures' dates, a day and month without a year after an event
    ("03/05/2024 - Pt c/o chest pain.", "DATE", "03/05/2024"),
    ("On 5 March 2024 the patient fell.", "DATE", "5 March 2024"),
    ("Electronically signed by Dr. Okafor on 03/05/2024", "DATE", "03/05/2024"),
    ("Discharged on 17 March.", "DATE", "17 March"),
    ("Pt is a 91M with a fall.", "AGE", "91"), ("Bed 4 - 94F - frail", "AGE", "94"),
    ("A ninety-two-year-old woman.", "AGE", "ninety-two"), ("aged ninety-four", "AGE", "ninety-four"),
    ("Claim number 88123471 denied.", "ACCOUNT", "88123471"),
    ("FIN: 44718822", "MRN", "44718822"),
    ("Encounter #: 99812234", "MRN", "99812234"),
    ("Med rec #: 00448812", "MRN", "00448812"),
    ("Hospital number 00448812", "MRN", "00448812"),
    ("Board cert: ABIM 123456.", "LICENSE", "ABIM 123456"),  # an issuing board's code, a blank, the number
    ("Board certification: ABIM 123456", "LICENSE", "ABIM 123456"),
    ("Ph: 5558675309", "PHONE", "5558675309"),
    ("Phone (home): 5558675309", "PHONE", "5558675309"),
    ("Phone:5558675309x12", "PHONE", "5558675309x12"),
])
def test_safe_harbor_types(text, typ, value):
    assert (typ, value) in [(f.type, f.value) for f in detect(text)], detect(text)


@pytest.mark.parametrize("text", [
    "The meeting is in 2019, room 101, ward 7, bed 12.", "A 45-year-old man, aged 67.", "Give 90 mg at 08:00.",
    "Order 55120934 shipped; version 4.2.1; part no. 4411-2200.", "The deadline is 03/15/2025.",
    "Temperature 98.6 F at noon.", "Visit example.com for the manual.", "Batch 2231-B passed ISO 13485.",
    "The plan was discussed with Radiology and handed over to Ward 4.", "Account: Q3 2024 budget.",
    "The fin 4 was bent. Claim 2 of the patent. Visit 3 of 4 done. Hospital 12 beds.",
    "Temp 94F at 0600; a 45M with chest pain; ninety-two beds; bus 91M.",
    "Release 2024-03-05 shipped; the May 5 meeting; order 12/2024 patient lift; ratio 12:34.",
    # what the new rules first took: temperatures, sizes and job codes as ages; software's dates and signatures;
    # things' ages; words after ID labels; colon-joined numbers; products as ranked officers or as a ward list
    "Temp 97-99F, fever (99F). Memory - 92M used; disk 97M, 98M; MOS: 91M, 92F; a 95M file; ResNet-50 - 98M params.",
    "Firmware 4.2 signed 2024-03-05 by vendor key. Document signed on 5 March 2024.",
    "2024-03-05 - patient dashboard deployed. On 2024-03-05 the patient module was refactored. 2024-03-05 pt-BR.",
    "The bridge is a hundred years old; a hundred-year-old tradition; cheese aged ninety days.",
    "We did not encounter 5000 errors. Warranty claim 12345678 for pump 4. Claim 2024-0001. time 10:11:12:13:14:15",
    "COL Postgres replication; CAPT Enalapril trial. Redis, Memcached - 64M. Oracle, Postgres - 30M",
    "The dashboard was deployed. On 2024-03-05 the team met.",  # an event's sentence ends before the date
    "Last name:\nString\nFull name:\nOptional\nLegal name:\nAcme Medical Supplies LLC\n",
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


# --- harder cases (each rule below was added with the case that needed it) -------------------------------
@pytest.mark.parametrize("text, name", [
    ("patient hope rader seen in clinic", "hope rader"),  # lower case after a strong role, a listed surname
    ("patient ugoumide draumide seen in clinic", "ugoumide draumide"),  # ... or two words in no list at all
    ("patient: francisca olaro was there", "francisca olaro"),  # a listed given name that is a word too
    ("PATIENT: MICKI DE SOLUME\nDOB: unknown", "MICKI DE SOLUME"),  # a particle in upper case
    ("Officer LORETTA BLAIS attended.", "LORETTA BLAIS"),  # upper case after any role
    ("Yesterday DAREN THARP called the ward.", "DAREN THARP"),  # upper case inside a line
    ("The form was signed by Ana J Okafor yesterday.", "Ana J Okafor"),  # an initial without its full stop
    ("Dr. Adaeze Eze and Prof. Tomasz Wiśniewski attended.", "Tomasz Wiśniewski"),  # Latin Extended-A
    ("Pt Solira MacErving, 100-year-old, was seen.", "Solira MacErving"),  # Mac + capital: never a word
    ("replaced by Charge Nurse Venita O'Harless today", "Venita O'Harless"),
    ("Present: L. Sollis; Soleka, Wendell. Apologies: none.", "Soleka, Wendell"),  # Last, First in a list
    ("Present: A. Belanger; van Quillen, Cleopatra.", "van Quillen, Cleopatra"),
    ("Contact: Champion, Emira", "Champion, Emira"),
    ("Thanks to Zanenna and Julia Esaw for the fix.", "Zanenna"),  # joined by "and" to a name, after a role
    ("Done with Easter Becnel (Charge Nurse).", "Easter Becnel"),  # a holiday that is a given name
    ("Jodi English and Louella Welsh will join.", "Louella Welsh"),  # nationalities that are surnames
    ("| Name | Role |\n| --- | --- |\n| Mbeira Adonte | Ward Sister |", "Mbeira Adonte"),  # a table's name column
    ("| Name | Ext |\n| --- | --- |\n| Harland Porter | 5512 |", "Harland Porter"),  # a role word as surname
    ("Veyumide Barber (RN) reviewed the chart.", "Veyumide Barber"),  # a credential after the name
    ("Rhyira Chanwo, 54, presented with chest pain.", "Rhyira Chanwo"),  # an age after the name
    ("Signed,\nNwaonte Draashi", "Nwaonte Draashi"),
    ("Could you and Chino van Redden look at it?", "Chino van Redden"),  # a particle between listed names
    ("Nurse Richter gave the dose.", "Richter"),  # a surname that names a scale, after a title
    ("Witness: Kwaanwo.", "Kwaanwo"),  # a single unlisted surname as a role's field value
    ("Discussed with Yesenia on the phone.", "Yesenia"),  # a listed given name, no word, after "with"
    # a word that makes a lone surname a thing ("Gigli saw", "Apgar score") follows full names as often
    ("Dr. Ana Smith saw her on the ward.", "Ana Smith"),
    ("John Smith saw her first.", "John Smith"),
    ("Sgt. Marroquin saw the fault first.", "Marroquin"),
    ("Margaret Okonkwo bed 12, stable overnight.", "Margaret Okonkwo"),
    ("Pt Margaret Okonkwo test results pending.", "Margaret Okonkwo"),
    ("Jamal Whitfield number is on file.", "Jamal Whitfield"),
    ("A. Okafor saw the patient.", "A. Okafor"),
    # a label that says its value is a person's name, whatever the value's words and case
    ("Last name: Park\nFirst name: Jin-woo", "Park"),
    ("First name: Will\nLast name: Okonkwo", "Will"),
    ("Employee name: will smith; Unit: 4W", "will smith"),
    ("Patient Name: Okonkwo, Margaret A.\nMRN: 12345678", "Okonkwo, Margaret A."),
    ("Surname: de Vries. Seen today.", "de Vries"),
    ("First name: Will, Last name: Smith", "Smith"),  # the next label is no surname after a comma
    ("Patient Name: Dr. Ana Smith", "Ana Smith"),  # a title before the name is left out of it
    ("Patient name:\nOkonkwo, Ngozi\nDOB: 1/2/1950", "Okonkwo, Ngozi"),  # the value on the line below the label
    ("Employee name:\r\n  will smith\r\nUnit: 4W", "will smith"),
    # military ranks as written, in capitals
    ("SPC Tillery is back on quarters.", "Tillery"),
    ("SGT LUIS MARROQUIN REPORTED THE FAULT.", "LUIS MARROQUIN"),
    ("CW2 Jin-woo Park signed the log.", "Jin-woo Park"),
    ("V/r,\n- CPT Thornbury", "Thornbury"),
    ("COL Baker attended.", "Baker"),
    ("Margaret Okonkwo's bed is ready.", "Margaret Okonkwo"),  # a possessive before a thing: still the person
    ("## Bed 12 - OKONKWO, MARGARET", "OKONKWO, MARGARET"),  # "Last, First" in capitals
    ('To: "THORNBURY, REBECCA CPT USARMY" <r.t@army.mil>', "THORNBURY, REBECCA"),  # a DoD address book's form
    ("pt margaret okonkwo seen on the ward", "margaret okonkwo"),  # lower case after "pt"
    ("Jin-woo Park signed the log.", "Jin-woo Park"),  # a hyphenated given name; a surname that is a place word
    ("Anne-Marie Okafor called.", "Anne-Marie Okafor"),
    ("On Mon, Jun 3, 2024 at 9:12 AM Thornbury, Rebecca CPT <r.t@army.mil> wrote:", "Thornbury, Rebecca"),
    # capitals beyond ASCII are capitals (a name was cut at the "Ñ"), and names are looked up without diacritics
    ("PATIENT: MUÑOZ, JOSÉ", "MUÑOZ, JOSÉ"),
    ("# Patient: GARCÍA LÓPEZ, MARÍA", "GARCÍA LÓPEZ, MARÍA"),
    ("Bed 12 - José Muñoz - NPO", "José Muñoz"),
    ("SGT JOSÉ MUÑOZ REPORTED", "JOSÉ MUÑOZ"),
    # given names in capitals after "SURNAME," on a form, the lists' or none
    ("PATIENT: EZE, CHUKWUEMEKA", "EZE, CHUKWUEMEKA"),
    ("PATIENT: NGUYEN, THI LAN", "NGUYEN, THI LAN"),
    # after a title, a given name the Census lists lack and the word list holds, before a frequent surname
    ("Dr. Arjun Patel saw her.", "Arjun Patel"),
    ("Seen by Dr. Anil Shah.", "Anil Shah"),
    ("Dr. Nils Smith called.", "Nils Smith"),
    ("Major Okafor signed.", "Okafor"),
    # ward lists: "Last, First" with an age and sex after it, whatever the lists know of the words
    ("Rm 402 Eze, Chukwuemeka - 67M", "Eze, Chukwuemeka"),
    ("Seen: Okafor, Virginia", "Okafor, Virginia"),  # a state's name as a given name, after a surname
    ("Rm 401B Nguyen, Thi Lan - 80F", "Nguyen, Thi Lan"),
    ("van der Berg, Pieter - 71M", "van der Berg, Pieter"),
    # officers' ranks before a name that is no word, listed or not
    ("COL Al-Rashid attended.", "Al-Rashid"),
    ("MAJ Okafor, COL Subramanian", "Subramanian"),
])
def test_harder_name_forms(text, name):
    assert name in persons(text), (text, detect(text))


@pytest.mark.parametrize("text", [
    "Seen by the Charge Nurse. Will the team check it?",  # a full stop after a role ends its sentence
    "Copied to the Charge Nurse and the Ward Sister. Will and May noted.",
    "The Senior Biomedical Engineer. Hope follow up.",
    "Escalated to the Duty Manager. Rose order the Foley catheter.",
    "Note the Charge Nurse: Will be reviewed",  # a label, then a sentence that starts with a word
    "Per Medicare, the claim was paid.",
    "Tour de Force was played.",
    "| Site name | Owner |\n| --- | --- |\n| Riverside Depot | Facilities |",
    "Owner: Facilities.",
    "ICU BED MANAGEMENT and the MRSA SCREEN. Use the GRACE PERIOD form.",
    "The Richter scale reading and the Holter monitor.",
    "Met with Medicare. Worked with Lincoln. Replaced with Teflon.",
    "patient ambulated independently today; patient recieved medicaton late",  # words, and misspelt words
    "The Gigli saw was used. Used a Luer lock and a Mayo stand. Apgar score 9. Babinski sign negative.",
    "Charge Nurse: Mayo stand ready. Walter Reed Hospital. Lou Gehrig disease. Glasgow Coma Scale 14.",
    "Insert Foley catheter. Adjust Allen key. Swan Ganz catheter placed. Kruskal Wallis test and Mann Whitney test.",
    "Last name: N/A\nFirst name: unknown\nusername: jdoe\nFile name: Will_and_Hope.txt",
    # below a label, a name is its line whole: not a sentence that starts there, nor the next label
    "Patient name:\nWill be confirmed by the ward clerk today.\nPatient name:\nDOB: pending",
    "Customer name: Acme Health Systems\nAuthor name: GitHub Actions\nOperator name: Night Shift",
    "The Sergeant Major reviewed the Major Trauma Centre plan.",
    # drugs: ordered, listed, named like people ("Allegra"); places listed; a rank's word is no name's start
    "Start Cipro 500 mg daily. Continue Colace. Hold Allegra tonight.",
    "Home meds: Lyrica, Allegra, Celexa. Allergies: Tylenol, Cipro.",
    "Transferred to St. Jude, St. Mary's and then Fort Worth, Texas.",
    "Daughter in Savannah, Georgia. Case discussed with Nissen surgeon. Tommy John surgery. The John Deere M-Gator.",
    "GEN Config loaded; the LTC Manual; LT Knee pain; Valve, Check - 12M.",
    "Café au lait spots. Seen at Clínica Médica Norte.",
    "CPT Code 99213 billed. LT Knee pain. MSG Received from the ICU Team. BG 5.4, MG 20 daily.",
    "Transferred to Johns Hopkins, then seen at Walter Reed. Grand Rounds on Friday. Stationed at Camp Lejeune.",
    "Diagnosed with Lou Gehrig's disease; history of Crohn's disease.",
    "A walk in Stanley Park and Victoria Park. A well-known Follow-up Clinic. THE WARD, ROUNDS AT NINE.",
])
def test_harder_look_alikes_survive(text):
    assert persons(text) == [], detect(text)


@pytest.mark.parametrize("text", [
    "The DoD contract dated 2024-01-01 was renewed.",  # "DoD" is a department, not a date of death
    "Firmware version 2024-01-15 released; weight 93.5 kg.",
])
def test_dates_and_numbers_with_no_person_stay(text):
    assert detect(text) == [], detect(text)


def test_a_name_is_found_again_in_lower_case():
    assert persons("Ana Okafor was seen. Later okafor asked for water.") == ["Ana Okafor", "okafor"]
    assert persons("Hope Okafor was seen. There is hope.") == ["Hope Okafor"]  # a word stays a word


def test_a_stress_of_look_alike_words_after_sentences_keeps_them():
    """Every word name of the corpus after every kind of phrase that ends a sentence or a label: none taken."""
    from tests.pii_corpus import NEGATIVES

    befores = [f"the {t}" for t in NEGATIVES["job title"][:6]] + NEGATIVES["eponym"][:4] + ["Dr. Ana Okafor"]
    for before in befores:
        for sep in (". ", "; ", ". Then ", ": "):
            for word in NEGATIVES["word name"]:
                text = f"Note {before}{sep}{word} follow up."
                i = text.index(f"{sep}{word} ") + len(sep)
                hits = [f for f in detect(text) if f.type == "PERSON" and f.start < i + len(word) and f.end > i]
                assert not hits, text


# --- dates tied to a person, shifted in pseudonymize mode ------------------------------------------------
def test_pseudonymize_shifts_a_persons_dates_by_one_offset():
    import datetime as dt

    key = b"k" * 32
    a = Scrubber("pseudonymize", key).scrub("Patient Ana Okafor was admitted on 2024-03-05 and discharged on "
                                            "2024-03-09.")[0]
    b = Scrubber("pseudonymize", key).scrub("Okafor, Ana. Seen on March 12, 2024 in clinic.")[0]
    import re

    d1, d2 = (dt.date.fromisoformat(x) for x in re.findall(r"\d{4}-\d\d-\d\d", a))
    assert "2024-03-05" not in a and (d2 - d1).days == 4  # the interval holds
    (shown,) = re.findall(r"[A-Z][a-z]+ \d+, \d{4}", b)
    moved = dt.datetime.strptime(shown, "%B %d, %Y").date()
    assert (moved - d1).days == 7  # the same person moved by the same days, in another record
    assert Scrubber("pseudonymize", b"other key" * 4).scrub("Ana Okafor was admitted on 2024-03-05.")[0] != \
        Scrubber("pseudonymize", key).scrub("Ana Okafor was admitted on 2024-03-05.")[0]
    # redact keeps redacting, and a date with no person in its text keeps its placeholder
    assert Scrubber("redact").scrub("Ana Okafor was admitted on 2024-03-05.")[0] == "[PERSON] was admitted on [DATE]."
    alone = Scrubber("pseudonymize", key).scrub("Admitted on 2024-03-05.")[0]
    assert re.fullmatch(r"Admitted on \[DATE_[0-9a-f]+\]\.", alone), alone


def test_pseudonymize_gives_one_person_one_fake_name_in_every_form():
    """One surrogate per person, a word at a time: the forms a text names someone by map onto one fake name,
    in the same case, in every record (keyed: another vault's key gives others)."""
    import re

    key = b"k" * 32
    text = ("Patient Margaret Okonkwo (MRN 12345678) seen. Okonkwo asked for water. M. Okonkwo signed.\n"
            "Patient Name: Okonkwo, Margaret\nPATIENT: MARGARET OKONKWO\nPatient Derek Hollis next; Hollis waits.")
    out = Scrubber("pseudonymize", key).scrub(text)[0]
    assert "Okonkwo" not in out and "OKONKWO" not in out and "Margaret" not in out and "Hollis" not in out, out
    first, last = re.search(r"Patient (\w+) (\w+) \(MRN", out).groups()
    assert f"{last} asked" in out and f"{first[0]}. {last} signed" in out, out
    assert f"Patient Name: {last}, {first}" in out and f"PATIENT: {first.upper()} {last.upper()}" in out, out
    derek, hollis = re.search(r"Patient (\w+) (\w+) next", out).groups()
    assert f"{hollis} waits" in out and hollis != last, out
    again = Scrubber("pseudonymize", key).scrub("Seen by Margaret Okonkwo today.")[0]
    assert again == f"Seen by {first} {last} today."  # the same in another record
    assert Scrubber("pseudonymize", b"j" * 32).scrub("Seen by Margaret Okonkwo today.")[0] != again
    s = Scrubber("pseudonymize", key)  # a word alone maps as it does in a full name, wherever it stands
    assert s.surrogate("Hollis") == hollis and s.surrogate("Okonkwo's") == f"{last}'s"
    assert s.surrogate("Ana de Vries") == s.surrogate("ANA DE VRIES").title() and \
        s.surrogate("de Vries") == s.surrogate("Vries") == s.surrogate("Ana de Vries").split()[-1]
    assert s.surrogate("O'Neil") == s.surrogate("O’Neil")


@pytest.mark.parametrize("value, days, out", [
    ("2024-03-05", 30, "2024-04-04"), ("2024-3-5", -3, "2024-3-2"), ("03/05/2024", 30, "04/04/2024"),
    ("25/12/2023", 30, "24/01/2024"), ("3/5/24", 30, "4/4/24"), ("March 5, 2024", 30, "April 4, 2024"),
    ("Sept. 5th, 2024", 30, "Oct. 5th, 2024"), ("5th of Jan, 2024", 30, "4th of Feb, 2024"),
    ("SEP 5, 2024", 30, "OCT 5, 2024"), ("31/02/2024", 30, None),
    ("19450312", 30, "19450411"), ("2024.03.09", 30, "2024.04.08"), ("12MAR45", 30, "11APR45"),
    ("5-Mar-2024", 30, "4-Apr-2024"), ("20240231", 30, None),
    ("0001.01.01", -30, None), ("31DEC9999", 30, None),  # past the calendar's ends: no shift, never an error
])
def test_shift_date_keeps_the_format(value, days, out):
    from appliance.vault.pii_safe_harbor import shift_date

    assert shift_date(value, days) == out


def test_cells_are_remembered_without_a_cliff():
    """A table with more distinct values than the cache holds keeps the newest ones (the oldest go), where a
    full cache used to be emptied at once."""
    from appliance.vault.pii import CELL_CACHE

    def value(i: int) -> str:  # lower case, no digit: the cheap path, remembered all the same
        return "value " + "".join(chr(97 + int(d)) for d in str(i))

    s = Scrubber("redact")
    for i in range(CELL_CACHE + 10):
        s.scrub_cell("site", value(i))
    assert len(s._cells) == CELL_CACHE and ("Site: ", value(CELL_CACHE + 9)) in s._cells
    assert ("Site: ", value(20)) in s._cells or ("Site: ", value(CELL_CACHE + 5)) in s._cells


def test_the_shape_prescan_finds_what_the_patterns_find():
    """Long ASCII text is scanned in its letter and digit shapes (`shapes`, `digit_shapes`); text with a letter
    beyond ASCII with the patterns themselves. Both must give the same candidates and findings."""
    from appliance.vault import pii, pii_names, pii_safe_harbor

    body = ("Patient Ana Okafor was seen by Dr. A. de Vries. Yesterday DAREN THARP called; O'BRIEN SMITH too.\n"
            "The KESTREL FROSTLINE bus and ICU BED logs. Reported by E. Zanume, 555-867-5309, SSN 123-45-6789.\n"
            "Witness: Okafor, Ana. Officer LORETTA BLAIS attended at 08:00:00 on 2024-03-05, fax 212 555 0199.\n")
    text = body * 30
    assert len(text) >= pii_names._SHAPES_FROM and text.isascii()
    shape = pii_names.shapes(text)
    key = [(c.start, c.end, c.detector) for c in pii_names._runs(text, shape)]
    assert key == [(c.start, c.end, c.detector) for c in pii_names._runs(text, None)]
    gaps = [m.span() for m in pii_names._upper_gaps(text, shape)]
    assert gaps == [m.span() for m in pii_names._UPPER_GAP.finditer(text)] and gaps
    digits = pii_safe_harbor.digit_shapes(text)
    assert pii._regions(text, digits) == pii._regions(text) != []
    assert pii_safe_harbor._prescan(text, text.lower(), digits) == pii_safe_harbor._prescan(text, text.lower())
    found = [(f.type, f.value) for f in detect(text)]
    assert ("PERSON", "Ana Okafor") in found and ("PERSON", "DAREN THARP") in found
    # a letter beyond ASCII at the end: the patterns alone read the text, and find the same before it
    assert [(f.type, f.value) for f in detect(text + " Zoë") if f.end <= len(text)] == found


def test_a_tables_name_and_phone_columns_are_read_as_their_labels_say():
    """Cells are read as "Column: value": a name column's cells are names whatever their words ("Park", "Will",
    "will smith"), and a phone column's bare digits are a phone; other columns' look-alikes stay."""
    s = Scrubber("redact")
    for column, value in [("last_name", "Park"), ("first_name", "Will"), ("employee_name", "will smith"),
                          ("Patient Name", "Okonkwo, Margaret"), ("surname", "Okonkwo")]:
        assert s.scrub_cell(column, value)[0] == "[PERSON]", (column, value)
    assert s.scrub_cell("phone", "5558675309")[0] == "[PHONE]"
    # columns that hold names without saying so, as exports and FHIR name them
    for column, value in [("family", "Okonkwo"), ("given", "Ngozi"), ("lname", "okonkwo"), ("firstName", "Will"),
                          ("signed_by", "Okonkwo"), ("name_text", "Ngozi Okonkwo"), ("subject_display", "Ana Eze")]:
        assert s.scrub_cell(column, value)[0] == "[PERSON]", (column, value)
    assert s.scrub_cell("identifier_value", "00448812")[0] == "[MRN]"
    assert s.scrub_cell("dob", "19450312")[0] == s.scrub_cell("date_of_birth", "12MAR45")[0] == "[DOB]"
    for column, value in [("site_name", "Will Park Depot"), ("count", "1234567"), ("signed_by", "auto"),
                          ("code_display", "Hemoglobin A1c"), ("status", "final"), ("order_no", "19450312"),
                          ("unit", "4W"), ("last_name", "N/A")]:
        assert s.scrub_cell(column, value)[0] == value, (column, value)


def test_names_joined_in_a_documents_path_are_found_not_in_code():
    """A file or directory named after a person ("margaret.okonkwo/", "Okonkwo-Margaret-notes.docx",
    "john_smith_123-45-6789.txt") loses the name, whatever the files under it; code joins words so too
    ("max_pool.py", "xlm_roberta/") and keeps them, as do places ("Los_Angeles.txt")."""
    from appliance.vault.fields import FieldScrubber

    fs = FieldScrubber("redact", b"k" * 32)
    for path, out in [("patients/margaret.okonkwo/note.md", "patients/[PERSON]/note.md"),
                      ("in/Okonkwo-Margaret-notes.docx", "in/[PERSON]-notes.docx"),
                      ("john_smith_123-45-6789.txt", "[PERSON]_[SSN].txt"),
                      ("ward/Hollis_Derek", "ward/[PERSON]"),
                      ("patients/margaret.okonkwo/scan.png", "patients/[PERSON]/scan.png"),  # any file under it
                      ("patients/margaret.okonkwo/notes.adoc", "patients/[PERSON]/notes.adoc"),
                      # a directory's name has no extension: its last word is no ".brown" file type
                      ("/Users/michael.brown/notes.txt", "/Users/[PERSON]/notes.txt"),
                      ("home/john.smith/a.md", "home/[PERSON]/a.md"),
                      ("maria.garcia.md", "[PERSON].md"),  # a given name that is a word too, a listed surname
                      # digits beside a name in a file's name: a birth date, a record number
                      ("OKONKWO_MARGARET_19450312.pdf", "[PERSON]_[DATE].pdf"),
                      ("scans/margaret_okonkwo_00448812.pdf", "scans/[PERSON]_[MRN].pdf")]:
        assert fs.path(path)[0] == out, (path, fs.path(path)[0])
    pseudo = FieldScrubber("pseudonymize", b"k" * 32).path("in/margaret_okonkwo_notes.pdf")[0]
    assert pseudo.startswith("in/") and " " not in pseudo and pseudo.count("_") == 2, pseudo  # joined as it was
    for path in ["report_20240305.pdf", "scan_0001234.png", "torch/nn/max_pool.py", "src/xlm_roberta/modeling.py",
                 "tz/America/Los_Angeles.txt",
                 "numbers.cpython-311.pyc", "docs/grace_period_policy.md", "notes/mark.down/a.md",
                 "rose.garden/a.md", "db/aurora-postgresql.json.gz", "Hong_Kong/office.md"]:
        assert fs.path(path)[0] == path, (path, fs.path(path)[0])
    for name in ["max_pool", "jack_knife_score"]:  # a table's columns and a repository's name join words so too
        assert fs.path(name, "column")[0] == fs.path(name, "meta.repo")[0] == name


def test_a_long_run_of_letters_that_are_both_cases_scans_in_linear_time():
    """Latin Extended-A letters count as capitals and as lower case: a hostile file of 100,000 of them made the
    name patterns try every length at every place (20,000 took 7.5 s; 100,000 would take minutes, growing with
    the square). Bounded word lengths scan it in well under a second; the bound here is two orders above that,
    so only the quadratic scan can reach it."""
    _runs_within("assert detect('Ł' * 100000) == [] and detect('Ą' * 100000 + ', could you') == []\n"
                 "assert [f.value for f in detect('Patient Łukasz Wiśniewski seen. ' + 'Ż' * 50000)] == "
                 "['Łukasz Wiśniewski']\n", 120)


def _runs_within(code: str, seconds: int) -> None:
    """`code` (with `detect` imported) finishes in a child process within `seconds`."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from appliance.vault.pii import detect\n" + code],
                       capture_output=True, text=True, timeout=seconds)
    assert r.returncode == 0, r.stderr[-500:]


def test_hl7_v2_segments_are_read_by_their_fields():
    """An HL7 v2 message's names ("OKONKWO^MARGARET^A"), IDs, birth date, address and phones are bare values
    that only their field says are PII: each is replaced by component, and the message keeps its structure."""
    msg = ("MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|LAB|GHH|202403051012||ADT^A01|MSG00001|P|2.5.1\r"
           "PID|1||00448812^^^HOSP^MR||OKONKWO^MARGARET^A||19450312|F|||12 Elm St^^Springfield^IL^62704||"
           "(217)555-0134|||||ACCT7731|123456789\r"
           "NK1|1|OKONKWO^JAMES|SPO^SPOUSE\r"
           "PV1|1|I|4W^12^01||||1234^HOLLIS^DEREK^^^DR\n"
           "10:12:01 OBX|1|TX|NOTE||stable overnight||||||F|||||5678^WHITFIELD^JAMAL")
    out = redact(msg)
    for value in ("00448812", "OKONKWO", "MARGARET", "19450312", "12 Elm St", "Springfield", "62704", "555-0134",
                  "ACCT7731", "123456789", "JAMES", "HOLLIS", "DEREK", "WHITFIELD", "JAMAL", "1234"):
        assert value not in out, (value, out)
    assert out.startswith("MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|")  # the header names no one
    assert "PID|1||[MRN]^^^HOSP^MR||[PERSON]^[PERSON]^[PERSON]||[DOB]|F|||[ADDRESS]^^[ADDRESS]^IL^[ZIP]||" in out
    assert "SPO^SPOUSE" in out and "4W^12^01" in out and "stable overnight" in out
    # documentation, shell output and tables that name a segment are no message
    for text in ["| PID | Name |\n| --- | --- |\n| 1 | pump |", "|PID|USER|TIME|COMMAND|\n|1234|root|00:01|nginx|",
                 "grep 'PID|' messages.log | wc -l returns 42", "|PID|5|Patient Name|",
                 "Columns: PID|NAME|STATUS|MEMORY 20MB", "Regex: ^(MSH|PID|PV1|OBX)\\|.*"]:
        assert redact(text) == text, text
    # without a header, a line with a component separator is a segment; a field takes only a value of its shape
    assert redact("PID|1||00448812^^^HOSP^MR||OKONKWO^MARGARET||19450312|F") == \
        "PID|1||[MRN]^^^HOSP^MR||[PERSON]^[PERSON]||[DOB]|F"
    assert redact("MSH|^~\\&|A|B\rPID|1||see chart||OKONKWO^MARGARET||unknown") == \
        "MSH|^~\\&|A|B\rPID|1||see chart||[PERSON]^[PERSON]||unknown"


def test_an_hl7_line_of_segments_scans_in_linear_time():
    """Each segment found was read to the end of its line, and a line held many ("PID|" repeated, or a message
    logged with its segment breaks stripped): 40,000 characters took 14 s, growing with the square. Fields are
    read up to the last one the segment's table names, and a line's end is found once; 160,000 characters take
    a fraction of a second, the bound here is two orders above that."""
    _runs_within("detect('1 ' + 'PID|' * 40000)\n"
                 "detect('MSH|^~\\\\&|X|\\r' + 'OBX|1|NM|GLU||105|mg/dL|||F|||20240305||1234^HOLLIS^DEREK|' * 2000)\n"
                 "detect('PID|1||1^^^^|A^B^C|' * 8000)\n", 60)


def test_an_hl7_file_is_ingested_as_text(tmp_path):
    from appliance.vault.readers.detect import plan

    (tmp_path / "adt.hl7").write_text("PID|1||00448812^^^HOSP^MR||OKONKWO^MARGARET\r")
    assert [i.kind for i in plan([tmp_path])] == ["text"]


def test_surrogate_names_stay_the_ones_earlier_versions_gave():
    """A person's surrogate must be the one the vault's earlier versions gave them: the names it is drawn from
    are pinned, whatever the name rules learn since (a rule that made "States" or "Falls" a word had moved every
    surrogate of their initials)."""
    import hashlib
    import json

    from appliance.vault import pii

    pools = pii._surrogate_pools()
    digest = hashlib.sha256(json.dumps(pools, sort_keys=True).encode()).hexdigest()
    assert digest == "299ed1e76e1ca2c507e5951b7b2abbd3d5beb1d761be2b660acb313d12f7bdc8"
    out = Scrubber("pseudonymize", b"k" * 32).scrub("Seen by Margaret Okonkwo and John Smith; Dr. Derek Hollis.")[0]
    assert out == "Seen by Quijano Kluge and Trent Willoughby; Dr. Yanes Franke."
