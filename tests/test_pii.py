from collections import Counter

import pytest

from appliance.vault.pii import STRUCTURED, Scrubber, detect, iban_ok, luhn_ok
from tests.pii_labeled import build


def _metrics():
    tp, fp, fn = Counter(), Counter(), Counter()
    for case in build():
        found = detect(case.text)
        matched = set()
        for f in found:
            hit = next((i for i, (t, s, e) in enumerate(case.spans)
                        if t == f.type and s == f.start and e == f.end), None)
            if hit is None:
                fp[f.type] += 1
            else:
                tp[f.type] += 1
                matched.add(hit)
        for i, (t, _s, _e) in enumerate(case.spans):
            if i not in matched:
                fn[t] += 1
    return tp, fp, fn


def test_structured_types_meet_recall_and_precision(capsys):
    tp, fp, fn = _metrics()
    report = []
    for t in STRUCTURED:
        recall = tp[t] / (tp[t] + fn[t])
        precision = tp[t] / (tp[t] + fp[t]) if tp[t] + fp[t] else 1.0
        report.append((t, recall, precision))
    with capsys.disabled():
        print("\nPII labeled set: " + ", ".join(f"{t} R={r:.3f} P={p:.3f}" for t, r, p in report))
    for t, recall, precision in report:
        assert recall >= 0.99, f"{t} recall {recall:.3f}"
        assert precision >= 0.95, f"{t} precision {precision:.3f}"


def test_context_types_are_found():
    tp, fp, fn = _metrics()
    for t in ("DOB", "MRN", "PASSPORT"):
        assert tp[t] / (tp[t] + fn[t]) >= 0.95, t
        assert tp[t] / (tp[t] + fp[t]) >= 0.95, t


def test_validators():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    # an order number is not a card, even when it passes Luhn
    assert not [f for f in detect("Order #4111111111111111 shipped") if f.type == "CARD"]
    assert [f.type for f in detect("Card 4111 1111 1111 1111")] == ["CARD"]
    assert not detect("upgrade to version 1.2.3.4")
    assert not detect("std::vector<int> at 12:30:45")
    # the IBAN stops at its country's length instead of swallowing a following word
    (f,) = detect("IBAN DE89 3704 0044 0532 0130 00 IN CASH")
    assert f.value == "DE89 3704 0044 0532 0130 00"
    # two numbers close together are both found (their search windows overlap)
    both = detect("my card is 4111 1111 1111 1111 and my IBAN is DE89 3704 0044 0532 0130 00.")
    assert [f.type for f in both] == ["CARD", "IBAN"]


def test_shortest_numbers_are_found_beside_short_runs():
    """Cards, SSNs, phones and IPv4 addresses are searched only where a run of digits is long enough to hold one
    (`pii._regions`): the shortest of each is still found, next to runs one digit short of it."""
    date = "Date: Fri, 03 Jan 2025 08:00:00 +0000\n"  # runs of 6 digits: none of these
    cases = [("CARD", "card 4222222222222 ref 422222222222"), ("SSN", "SSN 123-45-6789 vs 12-45-6789"),
             ("PHONE", "call 555-1234 or 55-1234"), ("IPV4", "host 10.0.0.1 up; 10 0 0 1 down")]
    for typ, body in cases:
        found = [(f.type, f.value) for f in detect(date + body)]
        assert [t for t, _ in found] == [typ], (typ, found)
    assert [f.type for f in detect("Zoë: call 555-1234, host 10.0.0.1")] == ["PHONE", "IPV4"]  # beyond ASCII
    assert not detect(date)


def test_names_from_reliable_signals():
    text = "Name: Jane Doe\nJane Doe called Dr. Okafor.\n\nBest regards,\nAlice Walker\n"
    found = {(f.type, f.value) for f in detect(text)}
    assert ("PERSON", "Jane Doe") in found and ("PERSON", "Alice Walker") in found
    assert ("PERSON", "Okafor") in found
    assert sum(1 for f in detect(text) if f.value == "Jane Doe") == 2
    assert {f.value for f in detect("hello Ingrid Berg", ("Ingrid Berg",))} == {"Ingrid Berg"}


def test_modes():
    text = "mail jane@example.com and JANE@example.com, call +44 20 7946 0958"
    red, counts = Scrubber("redact").scrub(text)
    assert red == "mail [EMAIL] and [EMAIL], call [PHONE]" and counts == {"EMAIL": 2, "PHONE": 1}
    ps = Scrubber("pseudonymize", b"k" * 32)
    pseudo, _ = ps.scrub(text)
    tokens = pseudo.split()
    assert tokens[1] == tokens[3].rstrip(",")  # same value (case-insensitive), same token
    assert tokens[1].startswith("[EMAIL_") and "jane" not in pseudo
    assert Scrubber("pseudonymize", b"j" * 32).scrub(text)[0] != pseudo  # keyed
    flagged, counts = Scrubber("flag").scrub(text)
    assert flagged == text and counts["EMAIL"] == 2
    assert Scrubber("off").scrub(text) == (text, Counter())
    with pytest.raises(ValueError):
        Scrubber("shred")


def test_table_cell_uses_column_as_context():
    s = Scrubber("redact")
    assert s.scrub_cell("ssn", "123456789")[0] == "[SSN]"
    assert s.scrub_cell("date_of_birth", "1984-03-12")[0] == "[DOB]"
    assert s.scrub_cell("inspection_date", "1984-03-12")[0] == "1984-03-12"
    assert s.scrub_cell("visit_date", "1984-03-12")[0] == "[DATE]"  # a date of service (Safe Harbor)
    assert s.scrub_cell("patient_name", "Jane Doe")[0] == "[PERSON]"
