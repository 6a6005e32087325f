"""Names of people in free text: context rules over public-domain name lists.

Three scans, each cheap on text that holds no names:
  - runs of capitalized words ("Ana Okafor", "Dr. A. de Vries", "Nurse Hollis", "Senior Biomedical Engineer
    Derek Hollis"): each word is scored as a given name and as a surname from the US Census 1990 name lists,
    and words that are ordinary English (Webster's 1934 word list) or job titles score nothing;
  - role words and titles in any case ("patient okonkwo", "PATIENT: MARGARET OKONKWO", "seen by Okafor"):
    the words after them are scored the same way, with the role as evidence;
  - "Last, First" pairs where both halves are listed names ("Okafor, Ana").
A candidate is kept when its evidence (given-name score + surname score + context) reaches `THRESHOLD`; its
words are then looked for on their own elsewhere in the text ("Okafor's chart"). Words that are names and
ordinary words at once ("Will", "May", "Hope", "Mark", months) need a surname or a title beside them, and
place, organisation and equipment words end a candidate ("Johns Hopkins Hospital", "Foley catheter").
"""

from __future__ import annotations

import functools
import gzip
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("data") / "names.txt.gz"
THRESHOLD = 1.5

# Given names that are also everyday words, months, or seasons: alone they are not evidence.
AMBIGUOUS_FIRST = frozenset("""
will may hope mark bill grant rose june april august joy faith grace dawn ray frank guy jack major king long
young lane page chance chase crystal amber ruby pearl iris ivy holly jasmine daisy lily violet heather olive
penny sandy rusty dusty sunny stormy star rocky summer winter autumn spring sterling walker carter mason hunter
cole ward queen princess prince angel destiny glory mercy patience prudence charity liberty harmony trinity
genesis season golden diamond coral jade jewel velvet maple willow sage moon sun song love many see so son in
an my man lady miss ma pa na un yen loan lean dot dell bell angle angelic aide echo omega alpha delta era nova
meta vita viva palma marine honey candy ginger cherry berry fern brook noble royal tiny windy sparkle blossom
fairy bunny dimple precious china temple lore desire cherish scarlet easter valentine marvel manual forest
freeman porter palmer parker tanner foster fletcher booker barton buck bud herb art earl rich reed clay basil
heath cliff rod rob chuck dean don dick deb bob pat sue kit carry marry drew sal brain merry mica opal garnet
emerald ivory ebony raven sierra savanna dixie misty sunshine tequila pansy magnolia hyacinth sol else
german junior china gay lean many noel ore van tory miles christian
georgia virginia washington carolina dakota london paris houston dallas austin denver phoenix portland
madison charlotte jackson lincoln hamilton victoria sydney florence kingston chester lancaster york
""".split())

# Titles: whatever capitalized word follows is taken as a name unless it is an ordinary word.
TITLES = frozenset("""
dr mr mrs ms mx miss prof sgt ssgt msgt capt lt ltc col maj cpl lcpl pvt pfc spc gen cdr lcdr adm cmdr
rev fr sister matron nurse sir dame mme mlle herr frau major
""".split())
# Titles and roles that are written as whole words: a full stop after one ends a sentence ("... the Charge
# Nurse. Will the team ...") and says nothing about the next word. Only abbreviations ("Dr.", "Pt.") carry on.
FULL_WORD_TITLES = frozenset("sister matron nurse sir dame miss herr frau".split())
ABBREVIATIONS = (TITLES - FULL_WORD_TITLES) | frozenset("pt tech attn cc".split())
# Roles: the words after them are likely a name.
ROLES = {
    **dict.fromkeys("patient pt patients".split(), 0.9),
    **dict.fromkeys("""
doctor physician surgeon nurse technician tech engineer operator supervisor manager officer inspector witness
driver resident consultant midwife paramedic pharmacist therapist radiographer sonographer anaesthetist
anesthetist anesthesiologist registrar intern attending fellow clinician hygienist dentist porter contractor
electrician fitter mechanic pilot sergeant captain lieutenant corporal private specialist colonel commander
admiral chaplain reviewer author owner requester caller client customer employee member relative mother
father son daughter wife husband spouse partner guardian sister brother friend neighbour neighbor colleague
technologist coordinator director lead chief assistant aide analyst administrator clerk soldier airman
sailor marine veteran decedent deceased donor recipient victim suspect subject resident tenant
visitor applicant student trainee apprentice foreman worker staff staffer courier maintainer practitioner
educator advisor adviser counsellor counselor auditor planner scheduler dispatcher controller steward
superintendent warden commissioner executive secretary receptionist housekeeper cleaner caretaker janitor guard
handler""".split(), 0.9),
    **dict.fromkeys("by with to from cc attn name named called signed contact and".split(), 0.4),
    "per": 0.8,
    **dict.fromkeys("present attendees apologies participants absent invitees attending".split(), 0.8),
    **dict.fromkeys("dear hi hello".split(), 0.8),
}
# Two words before a name that say a person follows ("thanks to Erlinda", "spoke with Hollis").
PAIR_ROLES = frozenset(("thanks to", "thank you", "spoke with", "spoke to", "talked to", "discussed with",
                        "handed over to", "over to", "escalated to", "assigned to", "met with", "seen by", "signed by",
                        "reported by", "reviewed by", "approved by", "checked by", "witnessed by", "performed by",
                        "family of", "wife of", "husband of", "son of", "daughter of", "mother of", "father of",
                        "partner of", "carer of", "next of kin"))
# An age right after a name: "Ana Okafor, 54, presented", "Derek Hollis (67)".
_AGE_AFTER = re.compile(r"(?:,[ \t]*|[ \t]*\()(?:aged[ \t]+)?\d{1,3}(?:[ \t]*(?:y/?o|yrs?|years?(?:[ \t-]*old)?))?"
                        r"[ \t]*[,)]")
_PAIR_SECOND = frozenset(r.split()[-1] for r in PAIR_ROLES)
# An age and sex after a name, as ward lists and handovers write a patient: "Eze, Chukwuemeka - 67M", "Ana
# Okafor, 54F", "Derek Hollis (71 M)".
_AGE_SEX_AFTER = re.compile(r"[ \t]*(?:[-–,(][ \t]*)\d{1,3}[ \t]*(?:[MF]|y/?o|yrs?)(?![A-Za-z0-9])"
                            r"(?=[ \t]*(?:$|[\r\n,;)\-–.]|(?:with|w/|c/o|s/p|h/o)(?![a-z])))", re.M)
# Credentials after a name ("Ana Okafor, RN", "Derek Hollis (MD)"): a person, whatever the words.
_CREDENTIAL = re.compile(r"[ \t]*(?:,[ \t]*|\([ \t]*)?(?:RN|MD|DO|NP|PA-C|LPN|CNA|RGN|RMN|PhD|DDS|PharmD|MBBS"
                         r"|MBChB|FRCS|MRCP|FRCP|CRNA|DNP|MSN|BSN|APRN|RPh|EMT|PE|CEng)(?![\w-])")
# Words after a name that make it a place, an institution or a medical eponym: "Walter Reed Hospital", "Lou
# Gehrig disease". After any name, however strong: the whole is not a person.
PLACE_AFTER = frozenset("""
hospital clinic center centre medical university institute street st road rd avenue ave boulevard blvd lane
drive way court place square unit ward wing building hall foundation company inc ltd llc corp corporation
group station base airport county park school college health healthcare pharmacy memorial
trust bank dynamics systems associates partners house river lake mountain bay valley island county city
district state river hotel church chapel cathedral library museum theatre theater stadium arena plaza
syndrome disease procedure maneuver manoeuvre reflex law principle effect equation award prize coma
""".split())
# Words after a name that make a lone surname a thing ("Foley catheter", "Gigli saw", "Apgar score", "Mayo
# stand"), but that follow a person's full name as often ("Dr. Ana Smith saw her", "Margaret Okonkwo bed 12",
# "Pt Margaret Okonkwo test results"): they end a name only when it is one word with no title or role before it.
THING_AFTER = frozenset("""
catheter tube mask valve pump key wrench screwdriver burner counter dish test sign score scale forceps clamp
retractor needle probe stitch knot bed frame splint brace collar fracture number sucker stand lock saw monitor
lamp lab laboratory
""".split())
NOT_PERSON_AFTER = PLACE_AFTER | THING_AFTER
# Words that start a place: "Fort Worth", "San Diego", "New Hollis".
PLACE_LEAD = frozenset("fort port san santa los las el la new north south east west saint st mount mt lake "
                       "cape glen upper lower great little old camp hong".split())
# Institutions, bases and events named after a person, written without the word that would say so ("seen at
# Walter Reed", "transferred to Johns Hopkins", "Grand Rounds on Friday").
INSTITUTIONS = frozenset(["johns hopkins", "walter reed", "grand rounds", "mayo clinic", "lou gehrig",
                          "sloan kettering", "cedars sinai", "scott white", "tripler army", "brooke army",
                          "william beaumont", "madigan army", "womack army", "martin luther king", "tommy john",
                          "john deere"])
# "Savannah, Georgia", "Richmond, Virginia": a city and its state, not "Last, First" (where the city is a given
# name or a word; "Okafor, Virginia" stays a person, and so does "Charleston, Virginia", a listed surname)
US_STATES = frozenset("""alabama alaska arizona arkansas california colorado connecticut delaware florida georgia
hawaii idaho illinois indiana iowa kansas kentucky louisiana maine maryland massachusetts michigan minnesota
mississippi missouri montana nebraska nevada ohio oklahoma oregon pennsylvania tennessee texas utah vermont
virginia washington wisconsin wyoming carolina dakota""".split())
# After a possessive, the nouns that make the name a disease, a sign or a law rather than a person: "Lou Gehrig's
# disease", "Crohn's disease"; but "Okonkwo's house" and "Margaret Okonkwo's bed" are the person's.
EPONYM_NOUNS = frozenset("""
disease syndrome sign reflex law principle effect palsy phenomenon maneuver manoeuvre procedure operation
ulcer sarcoma lymphoma fracture triad tumor tumour ataxia dystrophy anomaly node cyst canal gland duct
hernia pouch angle bursa formula criteria classification scale score solution technique theorem
""".split())
# Proper nouns that are never people in this setting, checked before the lists.
NOT_NAMES = frozenset("""
january february march july september october november december monday tuesday
wednesday thursday friday saturday sunday christmas easter
alabama alaska arizona arkansas california colorado connecticut delaware florida hawaii idaho illinois
indiana iowa kansas kentucky louisiana maine maryland massachusetts michigan minnesota mississippi missouri
montana nebraska nevada ohio oklahoma oregon pennsylvania tennessee texas utah vermont wisconsin wyoming
america american europe european africa african asia asian england english britain british scotland
scottish wales welsh ireland irish france french germany spain spanish italy italian norway
norwegian sweden swedish denmark danish finland finnish canada canadian mexico mexican chinese
japan japanese india indian russia russian nigeria nigerian kenya australia oslo bergen
berlin boston chicago seattle atlanta
god lord jesus christ allah
""".split())
# Equipment, tests and signs named after people, as they are written in notes: never a person on their own.
EPONYMS = frozenset("""
doppler holter yankauer luer geiger bunsen petri venturi heimlich apgar babinski korotkoff trendelenburg
bovie ambu hickman broviac groshong seldinger metzenbaum mcgill macintosh richter celsius fahrenheit
kelvin parkinson alzheimer crohn hodgkin tourette asperger nissen whipple billroth kasai epley valsalva
wenckebach brugada bazett kernig rovsing mcburney tinel phalen finkelstein kaposi burkitt wilms meckel zenker
charcot dupuytren guillain sjogren meniere behcet
""".split())
# Everyday words that start sentences and precede names ("Ask Okafor", "Call Hollis"): never a given name,
# even where the 1934 word list and a name list disagree about rarer words ("Arjun", a tree there).
COMMON = frozenset("""
a an the and or but if then so as at by for from in into of on onto per to with without via about after before
ask asked call called check checked see seen saw tell told thank thanks please contact email mail send sent met
meet let get got give gave have has had is are was were be been will would can could may might must shall should
do does did done make made take took say said note noted page paged phone phoned ring rang visit visited treat
treated review reviewed refer referred inform informed notify notified dear hi hello hey cc attn re fw fwd
this that these those there here when where while who whom whose which what why how all any each every both
no not nor only also just than too very our your their his her its my we you they he she it i me us them him
mister madam sir
start started continue continued hold held stop stopped resume resumed restart increase increased decrease
decreased discontinue discontinued titrate takes taking order ordered
""".split())
# Proper nouns above that are given names too ("Easter Becnel", "India Okafor"): a name before a listed surname.
GIVEN_PLACES = frozenset("easter sunday india kenya asia florida nevada america jesus maryland".split())
# Role words that are surnames as well ("Harland Porter", "Ana Driver"): after a listed given name, a surname.
ROLE_SURNAMES = frozenset("porter driver clerk guard steward foreman pilot warden handler sailor marine mechanic "
                          "courier".split())
# Proper nouns above that are never surnames after a given name ("Jesus Christ").
NOT_SURNAMES = frozenset("lord christ allah god jesus".split())
PARTICLES = frozenset("de da di du del della der den van von la le ter ten bin ibn al el st".split())
# Suffixes of ordinary words that a 1934 dictionary may lack ("biomedical", "endoscopy", "firmware").
_WORD_SUFFIX = re.compile(r"(?:ology|ologist|scopy|graphy|ical|ware|tion|sion|ment|ness|ship|able|ible|ists?"
                          r"|isms?|ics|ing|ings|ers|ed|ize|ise|ized|ised|izing|ising|ality|ivity|ous|ful|less)$")
_EXTRA_WORDS = frozenset("""
email online website software firmware hardware laptop smartphone internet app apps wifi login logout
biomedical endoscopy telemetry dashboard workflow checklist handover onboarding sepsis covid ebola mrsa
icu ed er or ot op ob gyn ent opd ipd ems ems ecg ekg eeg mri ct pet cpr dnr dnar iv im po prn bid tid qid
licence centre colour organisation programme theatre haemoglobin anaesthetic paediatric oesophagus defence
offence practise catalogue labour behaviour favour honour neighbour tumour odour rumour metre litre fibre
""".split())


@dataclass(frozen=True)
class NameLists:
    first: frozenset[str]
    last_rank: dict[str, int]
    words: frozenset[str]


@functools.cache
def lists() -> NameLists:
    """The name and word lists, read once per process (about 0.1 s)."""
    ranked = ranked_lists()
    return NameLists(frozenset(ranked["first"]), {n: i for i, n in enumerate(ranked["last"])},
                     frozenset([*ranked["words"], *_EXTRA_WORDS]))


@functools.cache
def ranked_lists() -> dict[str, list[str]]:
    """{"first": [...], "last": [...], "words": [...]}, lower case, names most frequent first."""
    out: dict[str, list[str]] = {}
    for section in gzip.decompress(DATA.read_bytes()).decode().split("# ")[1:]:  # split in C: ~0.05 s, not 0.2
        name, _, body = section.partition("\n")
        out[name] = body.split()
    return out


_UNFOLDED = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ß": "ss", "ł": "l", "đ": "d", "ð": "d", "þ": "th",
                           "ı": "i"})


def fold(w: str) -> str:
    """A word without its diacritics, as the name lists (US Census and SSA, in ASCII) write it: "josé" is
    "jose", "muñoz" "munoz", "ångström" "angstrom", "østergård" "ostergard"."""
    return unicodedata.normalize("NFKD", w.translate(_UNFOLDED)).encode("ascii", "ignore").decode("ascii")


INFLECTED_SURNAME_RANK = 1000  # "rivers" (700) is a surname first; "falls" (4288), "states" (11147) a verb first


class _Scorer:
    """Scores of one word (lower case) as a given name and as a surname, cached per process."""

    def __init__(self) -> None:
        self.n = lists()
        # plain dicts: faster than lru_cache on a method, and bounded by the vocabulary of the text
        self._word: dict[str, bool] = {}
        self._given: dict[str, float] = {}
        self._surname: dict[str, float] = {}

    def is_word(self, w: str) -> bool:
        out = self._word.get(w)
        if out is None:
            out = self._word[w] = self._is_word(w if w.isascii() else fold(w))
        return out

    def given(self, w: str) -> float:
        """How much `w` (lower case, one word) says "a given name"."""
        out = self._given.get(w)
        if out is None:
            out = self._given[w] = self._given_score(w if w.isascii() else fold(w))
        return out

    def surname(self, w: str) -> float:
        """How much `w` says "a surname"."""
        out = self._surname.get(w)
        if out is None:
            out = self._surname[w] = self._surname_score(w if w.isascii() else fold(w))
        return out

    def _is_word(self, w: str) -> bool:
        if w in self.n.words or w in NOT_NAMES or w in ROLES or w in TITLES or w in NOT_PERSON_AFTER:
            return True
        if self.inflection(w):  # a listed name that is a word's form is a name: "Rogers", "Richter", "Combs"
            return w not in self.n.first and w not in self.n.last_rank
        return bool(_WORD_SUFFIX.search(w)) and w not in self.n.last_rank and w not in self.n.first

    def inflection(self, w: str) -> str:
        """The ending that makes `w` a form of a listed word ("states": "s", "supplied": "ied"), or ""."""
        words = self.n.words
        for cut in ("s", "es", "ed", "d", "ing", "ly", "er", "ers"):
            if w.endswith(cut) and len(w) - len(cut) >= 3 and w[:-len(cut)] in words:
                return cut
        if w.endswith(("ies", "ied")) and len(w) > 5 and w[:-3] + "y" in words:  # "facilities", "supplied"
            return w[-3:]
        return ""

    def verb_form(self, w: str) -> bool:
        """A word's form in -s ("states", "walks", "takes") that is no frequent surname (`INFLECTED_SURNAME_RANK`:
        "rogers", "peters" are names first): in lower case after a role, a verb ("the patient states", "nurse
        takes"), where a capitalized one is a name as often ("Nurse Combs")."""
        rank = self.n.last_rank.get(w)
        return self.inflection(w) in ("s", "es", "ies", "ied") and (rank is None or rank > INFLECTED_SURNAME_RANK)

    def _given_score(self, w: str) -> float:
        if w in NOT_NAMES or w in ROLES or w in TITLES or w in EPONYMS:
            return 0.0
        if "-" in w:
            return max(self.given(p) for p in w.split("-") if p)
        if w in self.n.first:
            return 0.5 if w in AMBIGUOUS_FIRST else 1.0
        if self.is_word(w):
            return 0.0
        rank = self.n.last_rank.get(w)
        return 0.6 if rank is not None else 0.5

    def _surname_score(self, w: str) -> float:
        if w in NOT_NAMES or w in ROLES or w in TITLES or w in NOT_PERSON_AFTER or w in EPONYMS:
            return 0.0
        if "-" in w:
            return max(self.surname(p) for p in w.split("-") if p)
        rank = self.n.last_rank.get(w)
        word = self.is_word(w)
        if rank is not None and not word:
            return 1.0
        if rank is not None and rank < 10000:
            # Smith, White, Young: frequent surnames that are also words; Hackney, Kidder: rarer ones
            return 0.7 if rank < 3000 else 0.5
        if word:
            return 0.0
        return 0.6 if w in self.n.first and w not in AMBIGUOUS_FIRST else 0.6


@functools.cache
def scorer() -> _Scorer:
    return _Scorer()


# --- candidates ----------------------------------------------------------------------------------
_UP = "A-ZÀ-ÖØ-ÞĀ-ž"  # Latin Extended-A (Ł, Ś, Ž, ...) alternates cases: it counts as both
_LO = "a-zß-öø-ÿĀ-ž"
# A word in capitals, as address books, forms and headings write names: "THORNBURY", "MUÑOZ", "ÅNGSTRÖM"
_UP_WORD = rf"[{_UP}][{_UP}'’]+(?:-[{_UP}][{_UP}'’]+)?"
# Words are at most 40 letters, and the letters before an inner capital are taken possessively: a name is never
# longer, and without a bound a long run of letters that are both cases (Latin Extended-A, "ŁŁŁ...") made every
# search quadratic in it (20,000 of them took 7.5 s to scan).
_TOK = (rf"[{_UP}](?:['’][{_UP}])?(?:[{_LO}]{{1,40}}+[{_UP}])?[{_LO}]{{1,40}}(?:-[{_UP}{_LO}][{_LO}]{{1,40}})?")
# "Al-Haddad", "Jin-woo"
_INIT = rf"[{_UP}]\."
_PART = r"(?:de|da|di|du|del|della|der|den|van|von|la|le|ter|ten|bin|ibn|al|el)"
# One element of a run: a capitalized word, an initial ("A."), a title ("Dr.", "SSgt."), "O'Neil", "Al-Haddad".
# It starts with one capital letter, so the engine skips ahead to capitals quickly.
_ELEM = (rf"[{_UP}](?:[{_LO}]{{0,40}}+[{_UP}])?[{_LO}]{{0,40}}(?:['’][{_UP}][{_LO}]{{1,40}})?"
         rf"(?:-[{_UP}{_LO}][{_LO}]{{1,40}})?\.?")
# Two capitalized words in a row, maybe with a particle between: cheap to look for, and rare in prose; the
# whole run is matched only where this finds a start.
_PAIR = re.compile(rf"[{_UP}](?:[{_LO}]{{1,40}}(?:-[{_UP}{_LO}][{_LO}]{{1,40}})?\.?|\.)[ \t]+"
                   rf"(?:[{_LO}]{{1,4}}[ \t]+){{0,2}}[{_UP}](?:[{_LO}.'’]|[ \t]+[{_UP}][{_LO}])")
# (the last branch: "Ana J Okafor", an initial without its full stop)
_RUN = re.compile(rf"{_ELEM}(?:[ \t]+(?:{_PART}[ \t]+)*{_ELEM})+")
_ELEM_ONE = re.compile(rf"({_ELEM})|({_PART})")
_LAST_FIRST = re.compile(rf"({_TOK}), ({_TOK})(?: ({_INIT}))?(?![ \t]*[{_UP}{_LO}])")
# After a role word, in any case: up to three words, particles and initials allowed.
# A word in any case: "MUÑOZ", "Ångström", "o'brien" (the letters after the first in any case too: "MUÑOZ" is
# one word, not "MU" then a break)
_ANYTOK = r"(?:[A-Za-zÀ-ÖØ-öø-ž]['’])?[A-Za-zÀ-ÖØ-öø-ž]+(?:-[A-Za-zÀ-ÖØ-öø-ž]+)?"
_AFTER_ROLE = re.compile(rf"[ \t]*(?:[:#-][ \t]*)?((?:(?:{_INIT}|{_ANYTOK})[ \t]+(?:(?i:{_PART})[ \t]+)*){{0,2}}"
                         rf"{_ANYTOK})")
# Role words looked for in the lower-cased text with str.find (each costs a pass over the text, so only the
# roles that precede lower-case, upper-case or lone surnames are here; capitalized runs need none of them).
_ROLE_SCAN = ("patient", "nurse", "dr", "mr", "ms", " by ", "name", "witness", "pt")
_ROLE_HEAD = re.compile(r"[a-z. ]*?([a-z]+)\.?$")


@dataclass
class Candidate:
    start: int
    end: int
    score: float
    detector: str
    parts: tuple[str, ...]  # the words of the name, for the repeat scan


Word = tuple[int, int, str]  # (start, end, text)
_DOTTED = 1.1  # context of an abbreviated title ("Dr.", "Sgt."): stronger than "Nurse"


def _is_initial(w: str) -> bool:
    return len(w) == 2 and w.endswith(".")


def _score_run(words: list[Word], context: float, lower_ok: bool, particle: bool = False) -> float:
    """Evidence that `words` is one person's name, given `context`; particles are already left out."""
    sc = scorer()
    names = [w for _, _, w in words if not _is_initial(w)]
    if not names or (not lower_ok and any(w.islower() for w in names)):
        return 0.0
    low = [w.lower() for w in names]
    initial_first = _is_initial(words[0][2])
    if len(names) == 1:
        w = low[0]
        if names[0].islower() and (sc.is_word(w) or w not in sc.n.first and w not in sc.n.last_rank):
            return 0.0  # "engineer licence", "patient transport": lower case needs a listed name
        s = max(sc.given(w), sc.surname(w))
        if context >= _DOTTED or initial_first or context >= 1.0 and not sc.is_word(w):
            listed = (w in sc.n.last_rank or w in sc.n.first) and w not in NOT_NAMES and (
                w not in EPONYMS or context >= 1.0)
            s = max(s, 0.6 if listed else 0.0)  # "Sgt. Way", "B. Back"
        if initial_first:
            return s + 0.9 + max(context, 0.0) if s else 0.0
        return s + context if context >= 0.8 and s else 0.0
    first = 0.9 if initial_first else sc.given(low[0])
    if first == 0.0 and "-" in low[0]:  # "Jin-woo", "Anne-Marie": a listed given name before the hyphen
        head = low[0].split("-")[0]
        first = 1.0 if sc.given(head) >= 1.0 and not sc.is_word(head) else 0.0
    last = sc.surname(low[-1])
    if first == 0.0 and len(names) >= 2 and _given_before_surname(names[0], names[1], context):
        first = 0.5
    if last == 0.0 and low[-1] in sc.n.last_rank and (_is_initial(words[-2][2]) or first >= 1.0 or context >= 0.8):
        last = 0.5  # "J. Jubilee", "Mona Genet", "Patient Sydney Poley": a listed surname that is also a word
    if particle and len(names) == 2 and _listed(names[0]) and _listed(names[-1]):
        first, last = max(first, 0.5), max(last, 0.5)  # "Chino van Redden": a particle between two listed names
    if last == 0.0 and _CAMEL.match(names[-1]):
        last = 0.8  # "MacErving", "O'Harless": written as no ordinary word is
    if first == 0.0 or last == 0.0:
        return 0.0
    if len(words) > 2 and any(_is_initial(w) for _, _, w in words[1:-1]):
        first += 0.5  # a middle initial: "Rhyino J. Durant"
    if particle:
        first += 0.4  # "Veyanwo de West", "Ikume van der Adashi"
    if lower_ok and all(w.islower() for w in names):
        # lower case: the given name must be listed and never an ordinary word, or, right after a strong role
        # ("patient hope rader", "patient ugoume gleisner"), a surname that is no word must end it: a listed
        # one, or, after a given name that is no word either, one in no list ("patient ugoumide draumide")
        after_role = context >= 0.9 and low[0] not in COMMON and (
            low[0] in sc.n.first or not sc.is_word(low[0])) and (
            sc.surname(low[-1]) >= 1.0 or _unknown_word(low[-1]) and not sc.is_word(low[0]))
        if (low[0] not in sc.n.first or low[0] in AMBIGUOUS_FIRST) and not after_role:
            return 0.0
        if after_role:
            return first + last + context
    if names[0].islower() and low[0] not in sc.n.first and low[0] not in sc.n.last_rank:
        return 0.0  # lower case starts with a listed name; an unlisted surname may follow it
    if any(w.islower() and sc.is_word(lw) and lw not in sc.n.last_rank
           and not (i == 0 and lw in sc.n.first and lw not in AMBIGUOUS_FIRST)  # "francisca" is an axe too
           for i, (w, lw) in enumerate(zip(names, low))):
        return 0.0
    return first + last + context


def _unknown_word(lw: str) -> bool:
    """In no name list and no word at all (an invented or foreign name, as far as the lists can tell)."""
    sc = scorer()
    return len(lw) >= 3 and lw.isalpha() and lw not in sc.n.last_rank and lw not in sc.n.first \
        and not sc.is_word(lw) and lw not in NOT_NAMES and lw not in COMMON


def _context_before(text: str, start: int) -> float:
    """Strength of the role or title word just before `start` (same line)."""
    if not start or text[start - 1] == "\n":
        return 0.0  # the usual case in mail and forms, answered without slicing
    before = text[max(0, start - 32):start].rstrip(" \t:,(-").rsplit(None, 1)
    if not before or not before[-1]:
        return 0.0
    word = before[-1].lower()
    if not word[-1].isalpha() and word[-1] != ".":
        return 0.0
    if len(before) > 1 and word in _PAIR_SECOND and \
            f"{before[-2].lower().rsplit(None, 1)[-1] if before[-2] else ''} {word}" in PAIR_ROLES:
        return 0.8
    if word.endswith(".") and word.rstrip(".") not in ABBREVIATIONS:
        return 0.0  # "... the Ward Sister. Will": a sentence ended there
    if word.rstrip(".") in TITLES:
        return _DOTTED if word.endswith(".") else 1.0
    return ROLES.get(word.rstrip("."), 0.0)


def _breaks(w: str) -> bool:
    """An ordinary word that is no name at all ends a run of name words."""
    sc = scorer()
    lw = w.lower()
    return len(w) > 2 and sc.given(lw) == 0.0 and sc.surname(lw) == 0.0 and not _CAMEL.match(w)


# "MacErving", "O'Harless", "DeVries": a surname prefix glued to a capital; no dictionary word is written so,
# whatever its ending ("-ing", "-less") says
_CAMEL = re.compile(r"(?:Ma?c|O['’]|De|Di|Du|La|Le|Van|Von|Fitz)[A-Z][a-z]")


def _strong_given(w: str) -> bool:
    """A listed given name that is no ordinary word ("Jodi", "Harland"; not "Mark", not "Ask")."""
    lw = w.lower()
    return lw not in COMMON and lw in scorer().n.first and scorer().given(lw) >= 1.0


# Words that end a name as a place ("Central Park", `PLACE_AFTER`) but are common surnames after a given name.
_SURNAME_PLACES = frozenset("park hall lane church".split())


def _continues(part: list[Word], lw: str, context: float) -> bool:
    """A listed surname that is also a word ("Poley", "Genet", "Back") still belongs to the name when a title,
    an initial or a given name comes right before it."""
    sc = scorer()
    if len(part) == 1 and lw in sc.n.last_rank and (lw in NOT_NAMES and lw not in NOT_SURNAMES
                                                     or lw in ROLE_SURNAMES) \
            and _strong_given(part[0][2]):
        return True  # "Jodi English", "Roslyn Boston", "Harland Porter": a listed given name, then a surname
    given = part[0][2] if len(part) == 1 else ""
    if lw in _SURNAME_PLACES and lw in sc.n.last_rank and given and (
            "-" in given and _strong_given(given.split("-")[0]) or context >= 0.8 and _strong_given(given)):
        return True  # "Jin-woo Park", "Dr. Ana Hall"; not "Stanley Park"
    if not part and lw in EPONYMS and lw in sc.n.last_rank and context >= 1.0:
        return True  # "Dr. Parkinson", "Nurse Richter": after a title the person (a thing after it ends it later)
    if lw not in sc.n.last_rank and lw not in sc.n.first or lw in NOT_NAMES or lw in EPONYMS or lw in ROLES \
            or lw in TITLES or lw in NOT_PERSON_AFTER:
        return False
    if not part:
        return context >= _DOTTED or context >= 1.0 and not sc.is_word(lw)  # "Sgt. Way"; not "Nurse Service"
    prev = part[-1][2]
    return _is_initial(prev) or sc.given(prev.lower()) >= 0.5


_NUMBER_BEFORE = re.compile(r"\d[ \t]*$")
_ELEM_NAME = re.compile(rf"[{_UP}][{_LO}]+.*")


def _cached_split(text: str, m: re.Match) -> list[Candidate]:
    """`_split_run`, remembered: prose and mail repeat their capitalized phrases ("At Ridgeback Station",
    "Halvorsen Dynamics") far more often than they hold new ones. What `_split_run` reads lies within 32
    characters either side of the run (the role or title before it, the word, credential or age after it), so
    that window is the first key, read without a regex; a run seen in a new window is keyed as before, by its
    text, the strength of the role before it and what follows it."""
    lo = max(0, m.start() - 32)
    window = (m.start() - lo, text[lo:m.end() + 32])
    found = _WINDOW_CACHE.get(window)
    if found is None:
        after = text[m.end():m.end() + 1]
        nxt = _NEXT_WORD.match(text, m.end()) if after in " \t" and after else None
        key = (m.group(), _context_before(text, m.start()), nxt.group(1).lower() if nxt else "", after,
               after in " \t,(" and after != "" and (_CREDENTIAL.match(text, m.end()) is not None
                                                   or _AGE_AFTER.match(text, m.end()) is not None))
        found = _RUN_CACHE.get(key)
        if found is None:
            if len(_RUN_CACHE) > 50000:
                _RUN_CACHE.clear()
            base = m.start()
            found = _RUN_CACHE[key] = [(c.start - base, c.end - base, c.score, c.detector, c.parts)
                                       for c in _split_run(text, m)]
        if len(_WINDOW_CACHE) > 50000:
            _WINDOW_CACHE.clear()
        _WINDOW_CACHE[window] = found
    if not found:
        return []  # most runs: a list, not a generator, for a call that finds nothing
    base = m.start()
    return [Candidate(base + s, base + e, score, detector, parts) for s, e, score, detector, parts in found]


_WINDOW_CACHE: dict[tuple[int, str], list[tuple[int, int, float, str, tuple[str, ...]]]] = {}


def _split_run(text: str, m: re.Match) -> Iterator[Candidate]:
    """A run of capitalized words: titles and roles are context, ordinary words split it into parts."""
    elems = [(e.start(), e.end(), e.group()) for e in _ELEM_ONE.finditer(text, m.start(), m.end())]
    if m.start() and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "-/") and _is_initial(elems[0][2]):
        elems = elems[1:]  # "batch 2231-B. March": a code, not an initial
    elif elems and _is_initial(elems[0][2]) and _NUMBER_BEFORE.search(text, max(0, m.start() - 12), m.start()):
        elems = elems[1:]  # "98.6 F. Hope": a unit, not an initial
    context = _context_before(text, m.start())
    part: list[Word] = []
    span_start = -1  # where the part starts, a particle before its words included
    particle = False  # "de", "van der" in the part
    elems.append((m.end(), m.end(), ""))
    for k, (s, e, w) in enumerate(elems):
        lw = w.lower().rstrip(".")
        if w and w.islower() and lw in PARTICLES:
            span_start = s if span_start < 0 else span_start
            particle = True
            continue
        if len(w) == 1 and part and _ELEM_NAME.fullmatch(elems[k + 1][2]) and not _is_initial(part[-1][2]):
            w, lw = w + ".", lw  # "Ana J Okafor": a middle initial written without its full stop
        elif w and not _is_initial(w) and not any(c.islower() for c in w):
            w, lw, context = "", "", 0.0  # "A", "OK", "KE" (the start of "KESTREL"): no name word
        stop = w.endswith(".") and len(w) > 2 and lw not in TITLES
        if stop:  # "... Ana Okafor. Frank said": the full stop ends the sentence, and the name
            w, e = w[:-1], e - 1
        title = lw in TITLES
        if w and not title and (lw not in ROLES or _continues(part, lw, context)) and (
                _continues(part, lw, context) or not _breaks(w)
                or _given_before_surname(w, elems[k + 1][2], 0.0 if part else context)
                or _before_particle(w, elems, k)):
            part.append((s, e, w))
            span_start = s if span_start < 0 else span_start
            if not stop:
                continue
            w = lw = ""
        if part:
            if lw not in NOT_PERSON_AFTER:
                yield from _split_run_words(text, part, context, span_start, particle)
            context = 0.0
        part, span_start, particle = [], -1, False
        if (title or lw in ROLES) and (stop or w.endswith(".") and lw not in ABBREVIATIONS):
            context = 0.0  # "the Charge Nurse. Will", "Senior Engineer. Hope": a sentence ended there
        elif title:
            context = _DOTTED if w.endswith(".") else 1.0
        elif lw in ROLES:
            context = ROLES[lw]
        elif w:
            context = 0.0


# Given names that start questions and orders as verbs ("Will Derek Hollis attend?", "Mark Ana Okafor absent").
_VERBISH = frozenset("will may hope mark bill grant chase drew sue rob pat".split())
_SENTENCE_START = re.compile(r"(?:^|[.?!:;]\s+|\n\s*)$")


def _given_before_surname(w: str, nxt: str, context: float = 0.0) -> bool:
    """An unlisted capitalized word right before a listed surname that is no word ("Arjun Okafor"): a given
    name the lists lack, unless it is an everyday word ("Ask Okafor") or a place, a title or a thing. After a
    title, before a frequent surname that is a word too: "Dr. Arjun Patel", "Dr. Anil Shah", "Dr. Nils Smith"
    (the 1990 Census lists lack many given names, and the word list holds some: "arjun", "anil", "raj")."""
    lw = w.lower()
    if not w[:1].isupper() or lw in COMMON or lw in NOT_NAMES and lw not in GIVEN_PLACES or lw in ROLES \
            or lw in TITLES or lw in EPONYMS or lw in NOT_PERSON_AFTER or lw in PLACE_LEAD or len(w) < 3:
        return False
    return scorer().surname(nxt.lower().rstrip(".")) >= (0.7 if context >= 1.0 else 1.0)


def _listed(w: str) -> bool:
    """A listed given name or surname, even one that is also a word ("Chino", "Redden"), but no everyday
    word, place, role or title."""
    lw = w.lower()
    sc = scorer()
    return (lw in sc.n.first or lw in sc.n.last_rank) and not (
        lw in COMMON or lw in NOT_NAMES or lw in ROLES or lw in TITLES or lw in EPONYMS or lw in NOT_PERSON_AFTER
        or lw in PLACE_LEAD)


def _before_particle(w: str, elems: list[tuple[int, int, str]], k: int) -> bool:
    """A listed name right before a lower-case particle and a capitalized word: "Chino van Redden"."""
    return k + 2 < len(elems) and elems[k + 1][2] in PARTICLES and elems[k + 2][2][:1].isupper() and _listed(w)


def _split_run_words(text: str, part: list[Word], context: float, span_start: int,
                     particle: bool = False) -> Iterator[Candidate]:
    """One part of a run: judged unless it starts like a place ("New", "Fort", "San"). Leading words that
    cannot start a name ("Call Derek Hollis": "Call" is a listed surname but no given name) are dropped."""
    if part[0][2].lower() in PLACE_LEAD:
        return
    sc = scorer()
    while len(part) > 1 and not _is_initial(part[0][2]) and sc.given(part[0][2].lower()) == 0.0 \
            and not (len(part) == 2 and (_given_before_surname(part[0][2], part[1][2], context)
                                         or particle and _listed(part[0][2]))):
        part = part[1:]
        span_start = part[0][0]
    head = part[0][0]
    if len(part) >= 3 and part[0][2].lower() in _VERBISH and _SENTENCE_START.search(text, max(0, head - 8), head):
        part = part[1:]  # "Will Derek Hollis attend?": the verb starts the sentence, the name follows it
        span_start = part[0][0]
    if part:
        yield from _judge(text, part, context, "name-run", start=span_start, particle=particle)


def _judge(text: str, part: list[Word], context: float, detector: str, lower_ok: bool = False,
           start: int = -1, particle: bool = False, end: int = -1) -> Iterator[Candidate]:
    end = part[-1][1] if end < 0 else end
    if _CREDENTIAL.match(text, end) or _AGE_AFTER.match(text, end) or _AGE_SEX_AFTER.match(text, end):
        context += 0.8  # "Veyumide Barber (RN)", "Rhyira Chanwo, 54, presented", "Ana Okafor, 54F"
    if len(part) > 1:
        low = [w.lower() for _, _, w in part]
        if any(" ".join(low[:k]) in INSTITUTIONS for k in range(2, min(len(low), 3) + 1)):
            return  # "Walter Reed", "Martin Luther King", and what follows them: "John Deere M-Gator"
    score = _score_run(part, context, lower_ok, particle)
    first = part[0][0] if start < 0 else start
    lead = part[0][2]
    full = len(part) > 1 and (_is_initial(lead) or _strong_given(lead.split("-")[0]))
    if score >= THRESHOLD and not _followed_by_thing(text, end, full or context >= 0.8
                                                     and text[:first].rstrip(" \t")[-1:] not in (":", ",", "(")):
        yield Candidate(first, end, min(1.0, score / 2.5), detector,
                        tuple(w for _, _, w in part if len(w.rstrip(".")) > 1))


_NEXT_WORD = re.compile(r"[ \t]+([A-Za-z]+)")
_POSSESSIVE_NEXT = re.compile(r"['’]s[ \t]+([A-Za-z]+)")


def _followed_by_thing(text: str, end: int, strong: bool = False) -> bool:
    """Whether the word after `end` makes the name before it a place or a thing (`PLACE_AFTER`, `THING_AFTER`);
    `strong`: a full name that starts with a listed given name or an initial ("Margaret Okonkwo bed 12"; not
    "Insert Foley catheter", "Swan Ganz catheter"), or a title or role right before the name ("Sgt. Marroquin
    saw"; not a label, "Charge Nurse: Mayo stand")."""
    m = _NEXT_WORD.match(text, end)
    if not m:
        m = _POSSESSIVE_NEXT.match(text, end)
        return bool(m) and m.group(1).lower() in EPONYM_NOUNS  # "Lou Gehrig's disease"
    w = m.group(1).lower()
    return w in PLACE_AFTER or not strong and w in THING_AFTER


_RUN_CACHE: dict[tuple[str, float, str, str, bool], list[tuple[int, int, float, str, tuple[str, ...]]]] = {}


def _runs(text: str, shape: bytes | None = None) -> Iterator[Candidate]:
    p = _pair_search(text, shape, 0)
    while p:
        start = p.start()
        while start and (text[start - 1].isalpha() or text[start - 1] == "-" and start > 1
                         and text[start - 2].isalpha()):
            start -= 1  # "McDonald Smith": the pair starts at "Donald"; "Anne-Marie Okafor" at "Marie"
        m = _RUN.match(text, start)
        if m:
            yield from _cached_split(text, m)
        if not m or m.end() <= p.end() - 2:  # "Thanks to Erlinda and", "Per Froese, the": a lone name after a role
            yield from _lone(text, p.end() - 2)
        # resume at the second capital of the pair: "Reported by E. Zanume" pairs "Reported by E", then "E. Z"
        p = _pair_search(text, shape, m.end() if m else p.end() - 2)


# --- letter shapes: a prescan for the name rules ------------------------------------------------------
# Python's regex engine finds a literal at about 2 ns a character but tests a character class at about 8: a
# scan for "a capital letter, then ..." over a long text costs four times one for a fixed string. An ASCII
# text is therefore first written as its letter shapes in one `bytes.translate` ("U" an upper-case letter, "l" a
# lower-case one, and an apostrophe as a capital, for "O'BRIEN"; blanks and full stops as they are, anything
# else "#"). The shapes the name rules look for (a capitalized word, "Ul"; two upper-case words, "U U") start
# with a fixed letter there, found fast, and the exact pattern is matched on the text only where the shapes say
# it may (a superset of where it does). Other text (any letter beyond ASCII) is scanned with the patterns
# themselves, as before.
_SHAPE = bytearray(b"#" * 256)
_SHAPE[ord("A"):ord("Z") + 1] = b"U" * 26
_SHAPE[ord("a"):ord("z") + 1] = b"l" * 26
_SHAPE[ord("'")] = ord("U")
for _c in b" \t\n.(":
    _SHAPE[_c] = _c
SHAPES = bytes(_SHAPE)
_SHAPES_FROM = 2048  # shorter texts (a mail, a cell) are scanned directly: setting up the shapes costs more


def shapes(text: str) -> bytes | None:
    """The letter shapes of `text`, or None when it is not ASCII (then offsets in bytes would not be offsets
    in the text)."""
    return text.encode("ascii").translate(SHAPES) if text.isascii() else None


# `_PAIR` in shapes: it starts with one fixed letter, "U". Wherever `_PAIR` matches in an ASCII text, this
# matches in its shapes (the apostrophe after the second capital is a "U" there); the text's own match decides.
_PAIR_SHAPE = re.compile(rb"U(?:l+(?:#[Ul]l+)?\.?|\.)[ \t]+(?:l{1,4}[ \t]+){0,2}U(?:[lU.]|[ \t]+Ul)")


def _pair_search(text: str, shape: bytes | None, pos: int) -> re.Match | None:
    """`_PAIR.search(text, pos)`, found in the letter shapes where there are some."""
    if shape is None:
        return _PAIR.search(text, pos)
    c = _PAIR_SHAPE.search(shape, pos)
    while c:
        m = _PAIR.match(text, c.start())
        if m:
            return m
        c = _PAIR_SHAPE.search(shape, c.start() + 1)  # never in ASCII text; but never trust it blindly
    return None


def _lone(text: str, i: int) -> Iterator[Candidate]:
    """A single capitalized word at `i`, kept when a strong role or title comes right before it, or when it is a
    listed given name and no word at all after "with" or "by" ("Discussed with Yesenia", "seen by Latisha")."""
    context = _context_before(text, i)
    if context >= 0.4:
        m = _LONE.match(text, i)
        if m and not m.group(2):
            if context < 0.8:
                if not _strong_given(m.group(1)) or scorer().is_word(m.group(1).lower()) \
                        or text[max(0, i - 5):i].lower().split()[-1:] not in (["with"], ["by"]):
                    return
                context = 0.8
            yield from _judge(text, [(m.start(1), m.end(1), m.group(1))], context, "name-run")


_LONE = re.compile(rf"({_TOK})([ \t]+[{_UP}])?")
# The last word of the two-word roles (`PAIR_ROLES`) a lone name follows, as it is searched for. `_runs` reaches
# a role only from a capitalized word a short word or two before it ("Seen by Hollis"), not after a longer one
# ("Note reviewed by Whitfield", "Findings escalated to Whitfield").
_PAIR_KEYS = (" with ", " to ")  # and " by ", which `_after_roles` finds for its own rule


def _after_pair_roles(text: str) -> Iterator[Candidate]:
    """A lone capitalized name after a two-word role however the sentence starts (`_lone` judges it)."""
    n = len(text)
    for key in _PAIR_KEYS:
        i = text.find(key)
        while i != -1:
            j = i + len(key)
            if j < n and text[j].isupper():
                yield from _lone(text, j)
            i = text.find(key, j - 1)


def _after_roles(text: str, low: str, shape: bytes | None = None) -> Iterator[Candidate]:
    """Names after role words in any case: "patient okonkwo", "PATIENT: MARGARET OKONKWO", "seen by Hollis"."""
    n = len(low)
    for key in _ROLE_SCAN:
        i = low.find(key)
        while i != -1:
            j = i + len(key)
            # whole words only, and cheaply: "items", "drive", "patients" are passed over here
            if (not i or not low[i - 1].isalpha() or key[0] == " ") and (
                    j >= n or not low[j].isalpha() or key in ("mr", "ms") and low[j] == "s"):
                yield from _after_role_at(text, low, i + (key[0] == " "), key.strip())
            if key == " by " and j < n and text[j].isupper():
                yield from _lone(text, j)  # "Note reviewed by Whitfield" (`_after_pair_roles`)
            i = low.find(key, j)
    yield from _upper_after_roles(text, low, shape)


# The blank between two upper-case words ("…A OK…"): a literal first, which the engine finds faster than a
# capital letter, and a failed try costs a step or two however long the words are ("KESTREL", "FROSTLINE")
_UPPER_GAP = re.compile(rf" (?<=[{_UP}'’] )(?:[{_UP}]{{1,4}} )?[{_UP}][{_UP}'’]")
# `_UPPER_GAP` in the letter shapes (`shapes`), where an apostrophe is a capital: a fixed string first ("U ").
_UPPER_GAP_SHAPE = re.compile(rb"U (?:U{1,4} )?UU")


def _upper_gaps(text: str, shape: bytes | None) -> Iterator[re.Match]:
    """`_UPPER_GAP.finditer(text)`, found in the letter shapes where there are some: every place it matches
    there is one the shapes hold, and the pattern itself decides at each."""
    if shape is None:
        yield from _UPPER_GAP.finditer(text)
        return
    c = _UPPER_GAP_SHAPE.search(shape)
    while c:
        m = _UPPER_GAP.match(text, c.start() + 1)  # the look-behind reads the capital before the blank
        if m:
            yield m
        c = _UPPER_GAP_SHAPE.search(shape, m.end() - 1 if m else c.start() + 1)


_WORD_BEFORE = re.compile(r"(?<![a-z])([a-z]+)\.?[ \t]*:?[ \t]*$")
_LINE_START = re.compile(r"(?:^|\n)[ \t]*$")


def _upper_after_roles(text: str, low: str, shape: bytes | None = None) -> Iterator[Candidate]:
    """Upper-case names after any role or title not in `_ROLE_SCAN` ("Officer LORETTA BLAIS", "Driver: ANA
    OKAFOR"): the role is read from the word before the pair. Without a role, an upper-case pair inside a
    line is judged as one heading a line is (`_caps_name`): "Yesterday DAREN THARP called"."""
    sc = scorer()
    end = 0
    for g in _upper_gaps(text, shape):
        gap = g.start()
        lo = max(0, gap - 40)
        start = max(text.rfind(" ", lo, gap), text.rfind("\n", lo, gap), text.rfind("\t", lo, gap),
                    text.rfind("(", lo, gap), lo - 1) + 1  # the first word: back to the blank before it, in C
        if start < end or gap - start < 2:
            continue
        first = low[start:gap]
        if sc.given(first) < 1.0 and sc.is_word(first) or not text[start:gap].isupper():
            continue  # "ICU BED", "KESTREL TELEMETRY": no name starts with an ordinary word; "McDONALD"
        end = g.end()
        # what decides here lies within this window: a window seen before with nothing in it is passed over
        window = text[max(0, start - 24):g.end() + 40]
        if window in _UPPER_NOTHING:
            continue
        found = list(_upper_at(text, low, start))
        if found:
            yield from found
        else:
            if len(_UPPER_NOTHING) > 50000:
                _UPPER_NOTHING.clear()
            _UPPER_NOTHING.add(window)


_UPPER_NOTHING: set[str] = set()  # windows around upper-case pairs that held no name (prose repeats them)


def _upper_at(text: str, low: str, start: int) -> Iterator[Candidate]:
    """An upper-case pair starting at `start`: a name after a role, or a name by itself (`_caps_name`)."""
    role = _word_before(low, start)
    if role not in _ROLE_SCAN and (ROLES.get(role, 0.0) >= 0.9 or role in TITLES):
        yield from _after_role_at(text, low, low.rfind(role, 0, start), role)
    elif start and text[start - 1] in " \t(" and not _LINE_START.search(text, max(0, start - 8), start):
        m = _CAPS_AT.match(text, start)
        if m and _caps_name(m.group(1)):
            words = m.group(1).split()
            yield Candidate(m.start(1), m.end(1), 0.7, "name-caps", (words[0].capitalize(), words[-1].capitalize()))


def _word_before(low: str, i: int) -> str:
    """The word before `i` on its line, past blanks, a colon and a full stop: "officer" in "officer: ANA"."""
    j = i
    while j and low[j - 1] in " \t:.":
        j -= 1
    k = j
    while k and low[k - 1].isalpha():
        k -= 1
    return low[k:j] if j - k < 24 else ""


def _role_context(low: str, i: int, key: str) -> tuple[float, int]:
    """(strength, end of the role word) for a role key found at `i`; strength 0 when it is no role."""
    if i and low[i - 1].isalpha():
        return 0.0, i
    end = i + len(key.rstrip(" ."))
    while end < len(low) and low[end].isalpha():
        end += 1
    head = _ROLE_HEAD.search(low, i, end)
    role = head.group(1) if head else ""
    if end < len(low) and low[end] == "." and role not in ABBREVIATIONS:
        return 0.0, end  # "the nurse. will": a sentence ended there
    if key in ("name", "witness"):
        context = 0.8
    elif role in TITLES:
        context = _DOTTED if end < len(low) and low[end] == "." else 1.0
    else:
        context = ROLES.get(role, 0.6 if key == "by" else 0.0)
    if end < len(low) and low[end] == ".":
        end += 1
    return context, end


def _after_role_at(text: str, low: str, i: int, key: str) -> Iterator[Candidate]:
    context, end = _role_context(low, i, key)
    if context == 0.0:
        return
    m = _AFTER_ROLE.match(text, end)
    if not m:
        return
    sc = scorer()
    kept: list[Word] = []
    start = -1
    particle = False
    for e in _WORD.finditer(m.group(1)):
        w, s = e.group(), m.start(1) + e.start()
        lw = w.lower().rstrip(".")
        if lw in PARTICLES and (not kept or w.islower() or w.isupper() and kept[0][2].isupper()):
            start = s if start < 0 else start  # "de Vries", "MICKI DE SOLUME"
            particle = particle or bool(kept)
            continue
        listed_last = not kept and _COMMA_GIVEN.match(text, s + len(w)) and lw in sc.n.last_rank
        if len(w) <= 2 and not _is_initial(w) or lw in ROLES or lw in TITLES or w.islower() and (
                lw in COMMON or sc.verb_form(lw)) or (
                sc.given(lw) == 0.0 and not listed_last and not (kept and not w.islower() and _continues(kept, lw, 0.0))
                and (
                sc.surname(lw) == 0.0 or not kept and sc.surname(lw) < 0.7)):
            break
        if kept and _casing(w) != _casing(kept[0][2]):
            break  # "Nurse Iversen will repeat": a name keeps the case it started in
        kept.append((s, s + len(w), w))
        start = s if start < 0 else start
    if not kept:
        return
    if len(kept) == 1 and kept[0][2].lower() in AMBIGUOUS_FIRST and ":" in text[end:kept[0][0]] \
            and _LOWER_NEXT.match(text, kept[0][1]):
        return  # "Charge Nurse: Will be reviewed": a label, then a sentence that starts with a word
    tail = _COMMA_GIVEN.match(text, kept[-1][1])
    end = kept[-1][1]
    if len(kept) == 1 and tail and not _breaks(tail.group(1)):  # "Witness: Frazier, Ugooya": score it as
        kept.insert(0, (tail.start(1), tail.end(1), tail.group(1)))  # "Ugooya Frazier", keep the span
        end, context = tail.end(1), context + 0.4
    elif len(kept) <= 2 and _casing(kept[0][2]) == "upper":  # "PATIENT: EZE, CHUKWUEMEKA", "NGUYEN, THI LAN"
        end = _upper_given_after(text, end)
    norm = [(s, e, w.capitalize() if w.isupper() and len(w) > 2 else w) for s, e, w in kept]
    yield from _judge(text, norm, context, "name-role", lower_ok=True, start=start, end=end, particle=particle)


_WORD = re.compile(r"[^\s,;]+")
# Given names after a surname in capitals, as forms write a patient: "EZE, CHUKWUEMEKA", "NGUYEN, THI LAN".
_COMMA_UP_GIVEN = re.compile(rf", ({_UP_WORD})(?: ({_UP_WORD}))?(?![{_UP}{_LO}0-9'’-])")


# Clinical words in capitals that no word list holds: "SMITH, HYPOKALEMIA", "DOE, CHEMO" are no given names
_CLINICAL_WORD = re.compile(r"(?:emia|itis|osis|ectomy|otomy|ostomy|plasty|algia|pathy|oma|uria|penia|cytosis|sepsis"
                            r"|chemo|rehab|dialysis|hospice|covid|stemi|cabg|copd|chf|afib)$")


def _upper_given_after(text: str, end: int) -> int:
    """Where a name in capitals after a role ends: past ", GIVEN [MIDDLE]" when that follows `end` and each word
    is a listed given name or, of four letters or more, in no list and no word ("CHUKWUEMEKA"); not a credential
    ("OKAFOR, MD"), an abbreviation ("NPO", "ICU") or a word ("WARD 4", "STABLE"). Else `end`."""
    m = _COMMA_UP_GIVEN.match(text, end)
    if not m or _CREDENTIAL.match(text, end):
        return end
    sc = scorer()
    for g in (1, 2):
        w = m.group(g)
        if w is None:
            break
        lw = w.lower()
        if not (sc.given(lw) >= 1.0 or len(w) >= 4 and _unknown_word(lw) and not _CLINICAL_WORD.search(lw)):
            return end if g == 1 else m.end(1)
    return m.end()
_LOWER_NEXT = re.compile(r"[ \t]+[a-z]")


def _casing(w: str) -> str:
    return "lower" if w.islower() else "upper" if w.isupper() and len(w) > 2 else "title"
_COMMA_GIVEN = re.compile(rf", ({_TOK})(?![ \t]*[{_UP}{_LO}])")


_COMMA_CAP = re.compile(rf", (?=[{_UP}])")  # a literal first: the engine jumps from comma to comma
_ITEM_START = re.compile(r"(?:^|[;:\n|])[ \t]*$")
_PARTICLES_BEFORE = re.compile(rf"(?<![\w])(?:{_PART}[ \t]+)+$")
_TOK_END = re.compile(rf"{_TOK}$")
# The same in capitals, as address books and headings write it: "THORNBURY, REBECCA", "OKONKWO, MARGARET A."
_UP_END = re.compile(rf"(?<![{_UP}{_LO}]){_UP_WORD}$")
_LAST_FIRST_UP = re.compile(rf"({_UP_WORD}), ({_UP_WORD})(?: [{_UP}]\.?)?(?![{_UP}{_LO}'’-])")


_PLACE_BEFORE = re.compile(r"(?i:\b(?:st|saint|mt|mount|fort|ft|port|lake|san|santa|new)\.?[ \t]+)$")
# A label that lists drugs, on the line before a "Last, First" that is a drug list's items instead
_MEDS_LABEL = re.compile(r"(?i:meds|medications?|medicines?|drugs|prescriptions?|rx|allergies|allergic to)[ \t]*:"
                         r"[^\n:.;]*$")
# "Nguyen, Thi Lan - 80F": a given name of two words, where an age and sex after it say a patient is listed
_LAST_FIRST_AGED = re.compile(rf"({_TOK}), ({_TOK}[ \t]{_TOK})(?=" + _AGE_SEX_AFTER.pattern + ")")


def _aged_last_first(m: re.Match, particle: bool, text: str) -> bool:
    """"Eze, Chukwuemeka - 67M", "van der Berg, Pieter - 71M": a "Last, First" with an age and sex after it,
    whose words are no everyday words or roles and one at least a listed name that is no word (or a particle
    before it), or none a word where a bed or room comes before them; not "Redis, Memcached - 64M"."""
    if not _AGE_SEX_AFTER.match(text, m.end()):
        return False
    words = [w.lower() for w in (m.group(1), *m.group(2).split())]
    sc = scorer()
    return not any(w in COMMON or w in ROLES or w in TITLES or w in NOT_NAMES for w in words) and (
        particle or any((w in sc.n.first or w in sc.n.last_rank) and not sc.is_word(w) for w in words)
        or _WARD_BEFORE.search(text, max(0, text.rfind("\n", 0, m.start()) + 1, m.start() - 24), m.start())
        and not any(sc.is_word(w) for w in words))


# A ward list's place before a patient: "Rm 402", "Bed 12", "Bay 3"
_WARD_BEFORE = re.compile(r"(?i:(?<![a-z])(?:rm|room|bed|bay|pt|patient)(?![a-z]))")


def _last_first(text: str) -> Iterator[Candidate]:
    sc = scorer()
    for c in _COMMA_CAP.finditer(text):
        before = _TOK_END.search(text, max(0, c.start() - 40), c.start())
        m = before and (_LAST_FIRST.match(text, before.start()) or _LAST_FIRST_RANK.match(text, before.start())
                        or _LAST_FIRST_AGED.match(text, before.start()))
        if not m:
            up = _UP_END.search(text, max(0, c.start() - 40), c.start())
            m = up and _LAST_FIRST_UP.match(text, up.start())
            if m and len(m.group(2)) > 2 and not _CREDENTIAL.match(text, m.end(1)) \
                    and _caps_name(f"{m.group(2)} {m.group(1)}"):  # "OKONKWO, MARGARET"; not "HOLLIS, RN"
                yield Candidate(m.start(), m.end(), 0.8, "name-last-first",
                                (m.group(1).capitalize(), m.group(2).capitalize()))
            continue
        last, first = m.group(1).lower(), m.group(2).lower()
        if first in NOT_NAMES or first in PLACE_LEAD or _PLACE_BEFORE.search(text, max(0, m.start() - 8), m.start()) \
                or first in US_STATES and (last in sc.n.first or sc.is_word(last)):  # not "Okafor, Virginia"
            continue  # "St. Jude, St. Mary's", "Fort Worth, Texas": places listed
        lead = _PARTICLES_BEFORE.search(text, max(0, m.start() - 16), m.start())  # "van Quillen, Cleopatra"
        head = lead.start() if lead else m.start()
        # where an item of a list or a field starts (after ";", ":", "|" or a line break), weaker surnames do
        item = _ITEM_START.search(text, max(0, head - 8), head) is not None
        if _MEDS_LABEL.search(text, max(0, text.rfind("\n", 0, head) + 1, head - 200), head):
            continue  # "Home meds: Lyrica, Allegra, Celexa": drugs listed, not people
        listed = first in sc.n.first and first not in AMBIGUOUS_FIRST
        unlisted = not _breaks(m.group(2)) and first not in COMMON
        if listed and (sc.surname(last) >= 0.7 or item and sc.surname(last) >= 0.6) \
                or unlisted and sc.surname(last) >= 1.0 \
                or unlisted and item and _listed(last) and not sc.is_word(first) \
                or _aged_last_first(m, lead is not None, text):
            # "Okafor, Ana"; "Krasner, Chaeze"; "Obaeze, Rowena" and "Contact: Champion, Emira" in a list
            yield Candidate(head, m.end(), 0.8, "name-last-first", (m.group(1), m.group(2)))


# At the start of a line (the engine jumps from newline to newline): "Hi Darrick,", "Thanks Elaine!".
_GREETING = re.compile(rf"\n[ \t]*(?:(?i:hi|hello|hey|dear|thanks|thank you|good morning|morning|cheers)[ \t]+"
                       rf"({_TOK})[ \t]*(?:[,!:.]|\r?\n)|({_TOK}),[ \t]+(?:could|can|would|will|please|thanks|thank"
                       r"|do|did|are|have|just|see|let|when|if)\b)")


def _greetings(text: str) -> Iterator[Candidate]:
    """A single given name after a greeting at the start of a line."""
    sc = scorer()
    for m in _GREETING.finditer("\n" + text):
        g = 1 if m.group(1) else 2
        name, w = m.group(g), m.group(g).lower()
        if w not in ROLES and w not in TITLES and w not in NOT_NAMES and w not in COMMON and (
                w in sc.n.first or not _breaks(name)):
            yield Candidate(m.start(g) - 1, m.end(g) - 1, 0.7, "name-greeting", (name,))


def find_names(text: str, low: str) -> list[Candidate]:
    """Every person-name candidate the rules accept, in no particular order (overlaps allowed)."""
    shape = shapes(text) if len(text) >= _SHAPES_FROM else None
    out = list(_runs(text, shape))
    if ", " in text:
        out.extend(_last_first(text))
    out.extend(_after_roles(text, low, shape))
    out.extend(_after_pair_roles(text))
    out.extend(_greetings(text))
    out.extend(_after_ranks(text, shape))
    out.extend(_caps(text))
    if "|" in text:
        out.extend(_table_cells(text))
    if out:
        out.extend(_coordinated(text, out))
    return out


# Military ranks as they are written before a name, in capitals ("SPC Tillery", "SSG MARROQUIN", "CW2 Jin-woo
# Park", "CPT Thornbury"); the mixed-case forms ("Sgt.", "Capt.") are titles. Not "BG" or "MG" (blood glucose,
# milligrams), "SN" (a serial number) or "AB": they say something else as often in the appliance's texts.
RANKS = frozenset("""
PVT PV2 PFC SPC CPL SGT SSG SFC MSG 1SG SGM CSM WO1 CW2 CW3 CW4 CW5 2LT 1LT LT CPT MAJ LTC COL LTG GEN
PO1 PO2 PO3 CPO SCPO MCPO ENS LTJG LCDR CDR CAPT RDML RADM VADM ADM AMN A1C SRA SSGT TSGT MSGT SMSGT CMSGT
LCPL GYSGT MGYSGT SGTMAJ
""".split())
# "Thornbury, Rebecca CPT wrote:": a rank after the given name, as military mail signs and quotes
_LAST_FIRST_RANK = re.compile(rf"({_TOK}), ({_TOK})(?: ({_INIT}))?(?=[ \t]+(?:{'|'.join(sorted(RANKS))})(?![\w-]))")
# Ranks that are other abbreviations as often ("GEN Config", "CDR Records", "the LTC Manual", "MSG Received"):
# a name after them must be one the lists know.
_RANKS_ELSEWHERE = frozenset("GEN CDR ADM LT LTC COL MAJ ENS CAPT MSG SRA AMN CPO SN".split())
# Of those, the officers' ranks: before a listed name that is no word, however rare, a rank ("COL Al-Rashid",
# "LTC Subramanian"); the others take only common names ("GEN Config", "MSG Eze" stay).
_RANKS_OFFICERS = frozenset("COL LTC MAJ LT CAPT ENS".split())


def _no_word_name(w: str) -> bool:
    """A capitalized word (or hyphenated words, "Al-Rashid") that is a listed name, however rare, and no
    ordinary word: "Subramanian"; not "Postgres", "Jira", "Enalapril"."""
    sc = scorer()
    parts = w.lower().split("-")
    return w[:1].isupper() and not w.isupper() and any(p not in PARTICLES for p in parts) and all(
        p in PARTICLES or len(p) >= 3 and (p in sc.n.last_rank or p in sc.n.first) and not sc.is_word(p)
        and p not in NOT_NAMES and p not in COMMON for p in parts)


def _common_name(lw: str) -> bool:
    """One of the 30,000 most common surnames, or a listed given name that is no word: "Baker", "Okafor",
    "Derek"; not "Records" or "Manual", rarer surnames that are words or plurals of one."""
    sc = scorer()
    rank = sc.n.last_rank.get(lw)
    return rank is not None and rank < 30000 or lw in sc.n.first and not sc.is_word(lw) and sc.given(lw) >= 1.0


# Words that continue a rank rather than start a name: "SGT Major", "PFC First Class".
_RANK_WORDS = frozenset("major first class general colonel commander sergeant lieutenant chief master staff "
                        "technical senior command warrant officer grade retired ret usarmy usaf usn usmc usa uscg "
                        "arng usar ang civ ctr mil".split())  # and the services of a DoD address: "CPT USARMY"
# Found in the letter shapes (`shapes`, `_rank_hits`): an upper-case word, a blank, a capital; or a word ending in a
# digit ("CW2"); the rank itself is read from the text.
_RANK_AT = re.compile(r"[A-Z0-9]{2,6}\.?[ \t]")  # the same, in a text that has no shapes (not ASCII)
_RANK_NAME = re.compile(rf"[{_UP}](?:[{_UP}{_LO}'’]|-(?=[{_UP}{_LO}]))*\.?")


def _after_ranks(text: str, shape: bytes | None) -> Iterator[Candidate]:
    """Names after a military rank (`RANKS`): up to three words, each an initial, no ordinary word or a common
    name ("SGT LUIS MARROQUIN REPORTED" stops before "REPORTED"; "CPT Code 99213" is no name)."""
    if shape is None:
        shape = shapes(text) if len(text) < _SHAPES_FROM else None  # a short text's shapes cost a microsecond
    hits = _rank_hits(shape) if shape is not None else (m.end() for m in _RANK_AT.finditer(text))
    for at in hits:  # in prose, mostly headings in capitals: one slice and a set lookup each
        before = text[max(0, at - 8):at - 1].rsplit(None, 1)
        rank = before[-1].lstrip("(\"'-").rstrip(".") if before else ""
        if rank in RANKS:
            yield from _rank_name(text, at, rank)


def _rank_hits(shape: bytes) -> Iterator[int]:
    """Where a capital follows an upper-case word and a blank, by `bytes.find` in the letter shapes: in a text of
    headings in capitals there are many, and a find costs less than a match object."""
    for pattern, skip in ((b"U U", 2), (b"UU# U", 4)):
        i = shape.find(pattern)
        while i >= 0:
            yield i + skip
            i = shape.find(pattern, i + 1)


def _rank_name(text: str, at: int, rank: str = "") -> Iterator[Candidate]:
    sc = scorer()
    words: list[Word] = []
    pos = at
    while len(words) < 3:
        m = _RANK_NAME.match(text, pos)
        if not m or m.end() < len(text) and text[m.end()].isdigit():
            break
        w = m.group()
        if w.endswith(("'s", "’s")):
            w = w[:-2]
        lw = w.lower().rstrip(".")
        listed = lw in sc.n.first or lw in sc.n.last_rank
        if not _is_initial(w) and (len(lw) < 2 or lw in _RANK_WORDS or lw in NOT_NAMES or lw in TITLES
                                   or sc.is_word(lw) and sc.surname(lw) < 0.7 and sc.given(lw) < 0.5
                                   and not (words and lw in sc.n.last_rank)
                                   or not words and rank in _RANKS_ELSEWHERE and not _common_name(lw)
                                   and not (rank in _RANKS_OFFICERS and _no_word_name(w))
                                   or not words and not listed and lw.endswith("s") and sc.is_word(lw[:-1])):
            break  # an ordinary word that is no common name: "CPT Code", "LT Knee"; not "SGT Baker", and after
            # a name's first word any listed surname: "CW2 Jin-woo Park"
        words.append((m.start(), m.start() + len(w), w))
        gap = re.match(r"[ \t]+", text[m.end():m.end() + 4])
        if not gap or w.endswith("'s") or len(w) < len(m.group()):
            break
        pos = m.end() + gap.end()
    while words and _is_initial(words[-1][2]):
        words.pop()  # "SGT A." is no name; "SGT A. Okafor" is
    if words and not (len(words) == 1 and _followed_by_thing(text, words[-1][1], True)):
        yield Candidate(words[0][0], words[-1][1], 0.9, "name-rank",
                        tuple(w.capitalize() if w.isupper() else w for _, _, w in words if len(w.rstrip(".")) > 1))


# At the start of a line (a newline is a literal the engine jumps to); after a role word the role scan has them.
_CAPS_PART = r"(?:VAN|VON|DE|DER|DEN|DA|DI|DU|DEL|DELLA|LA|LE|TER|TEN|BIN|IBN|AL|EL)"
_CAPS_WORDS = (rf"([{_UP}][{_UP}'’]++(?:[ \t]+[{_UP}]\.)?(?:[ \t]+{_CAPS_PART}(?=[ \t]))*[ \t]+"
               rf"[{_UP}][{_UP}'’]++(?:-[{_UP}][{_UP}'’]+)?)(?![{_UP}{_LO}])")
_CAPS_PAIR = re.compile(r"\n[ \t]*" + _CAPS_WORDS)
_CAPS_AT = re.compile(_CAPS_WORDS)  # the same pair inside a line, matched where it starts


def _caps(text: str) -> Iterator[Candidate]:
    """Upper-case names heading a line without a role before them ("MARGARET OKONKWO" on a form)."""
    for m in _CAPS_PAIR.finditer("\n" + text):
        if _caps_name(m.group(1)):
            words = m.group(1).split()
            yield Candidate(m.start(1) - 1, m.end(1) - 1, 0.7, "name-caps",
                            (words[0].capitalize(), words[-1].capitalize()))


_CAPS_SEEN: dict[str, bool] = {}  # upper-case pairs judged, per process: prose repeats its acronyms


def _caps_name(pair: str) -> bool:
    """Whether an upper-case pair with no role before it is a name: a listed given name that is no everyday
    word, then a surname-like word; or a given name the lists lack, then a listed surname ("EMEKA HEALY") or a
    particle and no word ("HESTER VAN DER NWAANWO")."""
    out = _CAPS_SEEN.get(pair)
    if out is None and pair.split()[0] in RANKS:
        out = False  # "SSG MARROQUIN": the rank is no given name (`_after_ranks` takes the name after it)
    if out is None:
        sc = scorer()
        words = pair.split()
        first, last = words[0].lower(), words[-1].lower()
        particle = any(w.lower() in PARTICLES for w in words[1:-1])
        unlisted_first = not sc.is_word(first) and first not in COMMON and first not in NOT_NAMES and (
            sc.surname(last) >= 1.0 or particle and not sc.is_word(last))
        out = sc.given(first) >= 1.0 and first not in COMMON and (sc.surname(last) >= 0.6 or _listed(last)) \
            or unlisted_first
        if len(_CAPS_SEEN) > 50000:
            _CAPS_SEEN.clear()
        _CAPS_SEEN[pair] = out
    return out


_PATH_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")


def path_names(text: str) -> list[str]:
    """Names in a file's or directory's name, where words are joined by `_`, `-`, `.` or a blank in any case and
    either order: "margaret.okonkwo", "Okonkwo-Margaret", "john_smith" (`_path_pair`, read both ways); as
    written, to be looked for as one."""
    dot = text.rfind(".")
    # "frames.py": its extension is no name; "michael.brown", a directory, has none
    ext = dot if dot > 0 and text[dot + 1:].lower() in _EXTENSIONS else len(text)
    words = [w for w in _PATH_WORD.finditer(text) if w.end() <= ext]
    out = []
    for a, b in zip(words, words[1:]):
        if b.start() - a.end() != 1 or text[a.end()] not in "_-. ":
            continue
        x, y = a.group().lower(), b.group().lower()
        if len(x) > 2 and len(y) > 2 and x not in PLACE_LEAD and (_path_pair(x, y) or _path_pair(y, x)):
            out.append(text[a.start():b.end()])
    return out


def _path_pair(given: str, surname: str) -> bool:
    """A listed given name that is no word at all, then a surname: a common listed one, or a word in no list
    and no word at all ("okonkwo"). A listed given name of four letters or more that is a word too ("maria")
    takes only a listed surname that is no word ("maria.garcia"; not "mark.down", "rose.garden", "aurora-postgresql",
    "max.decTest")."""
    sc = scorer()
    if not (_strong_given(given) and given not in AMBIGUOUS_FIRST and given not in NOT_NAMES):
        return False
    if surname in NOT_NAMES or surname in COMMON or surname in TITLES or surname in ROLES:
        return False
    rank = sc.n.last_rank.get(surname)
    unlisted = rank is None and surname not in sc.n.first and len(surname) >= 4 and not sc.is_word(surname)
    if sc.is_word(given):
        return len(given) >= 4 and rank is not None and sc.surname(surname) >= 1.0
    return rank is not None and rank < 50000 and sc.surname(surname) >= 0.6 or unlisted


# File name extensions, which end a file's name and are no surname ("frames.py"); any other ending after a full
# stop is a word of the name ("michael.brown/")
_EXTENSIONS = frozenset("""
md markdown rst txt text log hl7 adoc org py pyi ipynb c h cc cpp hpp cs go rs java kt scala rb php pl r jl lua
swift m sh bash zsh ps1 bat sql toml yaml yml ini cfg conf json jsonl ndjson csv tsv parquet xlsx xls docx doc
pptx ppt odt ods odp rtf pdf eml mbox msg bak tmp old orig gz bz2 xz zst zip tar tgz 7z rar npy npz pt bin
safetensors gguf onnx ckpt html htm xml xhtml css js ts svg png jpg jpeg gif bmp tif tiff webp heic ico dcm dicom
mp3 wav flac ogg m4a mp4 mov avi mkv webm wmv db sqlite duckdb dat exe dll so dylib iso img dmg deb rpm whl egg
""".split())


# After a name: ", ", "; ", " and ", " or ", " & " and the next item of the list.
_NEXT_ITEM = re.compile(rf"(?:[ \t]*[,;&][ \t]*|[ \t]+(?:and|or)[ \t]+)(?=[{_UP}])")
_ITEM = re.compile(rf"{_ELEM}(?:[ \t]+(?:{_PART}[ \t]+)*{_ELEM})*")


def _coordinated(text: str, found: list[Candidate]) -> Iterator[Candidate]:
    """Names listed with a name already found ("Thanks to Shanda and Kwaumide Ridder", "Present: A; B; C"):
    each next item is judged with the list as its context."""
    seen = {c.start for c in found}
    todo = sorted(found, key=lambda c: c.start)
    while todo:
        c = todo.pop(0)
        sep = _NEXT_ITEM.match(text, c.end)
        item = sep and _ITEM.match(text, sep.end())
        if not item or item.start() in seen or item.end() < len(text) and text[item.end()].isalpha():
            continue  # and not a word cut short: "COL" in "MAJ Okafor, COL Al-Rashid" is no name "CO"
        words = [(e.start(), e.end(), e.group().rstrip(".") if len(e.group()) > 2 else e.group())
                 for e in _ELEM_ONE.finditer(text, item.start(), item.end()) if e.group(1)]
        words = [(s, s + len(w), w) for s, _, w in words]
        particle = any(e.group(2) for e in _ELEM_ONE.finditer(text, item.start(), item.end()))
        if len(words) == 1 and (words[0][2].lower() in AMBIGUOUS_FIRST or scorer().is_word(words[0][2].lower())):
            continue  # "Derek Hollis and May": a lone word that is a name and a word stays a word
        for cand in _judge(text, words, 0.8, "name-list", start=item.start(), particle=particle):
            seen.add(cand.start)
            todo.append(cand)
            yield cand
    yield from _coordinated_before(text, found, seen)


_PREV_ITEM = re.compile(rf"(?<![\w'’-])({_TOK})(?:[ \t]*&[ \t]*|[ \t]+and[ \t]+)$")


def _coordinated_before(text: str, found: list[Candidate], seen: set[int]) -> Iterator[Candidate]:
    """A single word joined by "and" to a name found, with a role before it ("Thanks to Zanenna and Julia
    Esaw"): the list and the role together are its context. Without a role it stays a word ("Hope and ...")."""
    for c in found:
        lo = max(0, c.start - 40)
        head = text[lo:c.start].rstrip(" \t")
        # what `_PREV_ITEM` must end with: "&", or "and" between blanks; a search only where it does
        if not (head.endswith("&") or head.endswith("and") and lo + len(head) < c.start and head[-4:-3] in (" ", "\t")):
            continue
        m = _PREV_ITEM.search(text, lo, c.start)
        if not m or m.start(1) in seen or _context_before(text, m.start(1)) < 0.8:
            continue
        w = m.group(1)
        if w.lower() in AMBIGUOUS_FIRST or scorer().is_word(w.lower()):
            continue
        for cand in _judge(text, [(m.start(1), m.end(1), w)], 1.2, "name-list"):
            seen.add(cand.start)
            yield cand


# Column headers of a Markdown table whose cells hold people by name.
PERSON_HEADERS = frozenset(("name", "full name", "patient", "patient name", "staff", "staff name", "employee",
                            "contact", "owner", "engineer", "technician", "nurse", "doctor", "physician",
                            "clinician", "surgeon", "reviewer", "author", "signed by", "assigned to", "attendee",
                            "person", "witness", "operator", "inspector", "customer", "client", "who"))
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*\r?$", re.M)
_CELL = re.compile(r"\|([^|\n]*)(?=\|)")


def _table_cells(text: str) -> Iterator[Candidate]:
    """The cells of a Markdown table under a column that names people ("| Name | Role |"): each judged with
    the column as its context, as a role word before it would be."""
    cols: list[int] | None = None
    last_end = -1
    for row in _TABLE_ROW.finditer(text):
        if row.start() != last_end + 1:
            cols = None  # a new table
        last_end = row.end()
        cells = list(_CELL.finditer(text, row.start(), row.end()))
        if cols is None:
            cols = [i for i, c in enumerate(cells) if c.group(1).strip().lower() in PERSON_HEADERS]
            continue
        for i in cols:
            if i < len(cells):
                yield from _cell_name(text, cells[i].start(1), cells[i].end(1))


def _cell_name(text: str, start: int, end: int) -> Iterator[Candidate]:
    elems = list(_ELEM_ONE.finditer(text, start, end))
    words = [(e.start(), e.end(), e.group()) for e in elems if e.group(1)]
    if not words or text[start:end].strip() != text[elems[0].start():elems[-1].end()]:
        return  # a cell with more than names in it
    yield from _judge(text, words, 0.9, "name-table", start=elems[0].start(),
                      particle=any(e.group(2) for e in elems))


def repeat_words(cands: list[Candidate]) -> set[str]:
    """The single words of accepted names worth finding again alone ("Okafor" after "Ana Okafor")."""
    if len(cands) == 1:  # one name's words, remembered: mail repeats its people in every message
        parts = cands[0].parts
        out = _REPEAT.get(parts)
        if out is None:
            if len(_REPEAT) > 50000:
                _REPEAT.clear()
            out = _REPEAT[parts] = frozenset(_repeat_words(parts))
        return set(out)
    return _repeat_words(w for c in cands for w in c.parts)


_REPEAT: dict[tuple[str, ...], frozenset[str]] = {}


def words_of(names) -> set[str]:
    """The words of names found (`Finding.value`s) worth looking for again in the other fields and records of
    the same file: "Okonkwo" of "Margaret Okonkwo" (`repeat_words`' rule)."""
    key = tuple(names)
    out = _WORDS_OF.get(key)
    if out is None:  # remembered: mail repeats its people in every message
        if len(_WORDS_OF) > 50000:
            _WORDS_OF.clear()
        out = _WORDS_OF[key] = frozenset(_repeat_words(w.strip(".,;:'’") for n in names
                                                       for w in n.replace(",", " ").split()))
    return set(out)


_WORDS_OF: dict[tuple[str, ...], frozenset[str]] = {}


def _repeat_words(words) -> set[str]:
    sc = scorer()
    out = set()
    for w in words:
        lw = w.lower()
        if len(w) >= 3 and not sc.is_word(lw) and lw not in AMBIGUOUS_FIRST and lw not in NOT_NAMES \
                and lw not in TITLES and lw not in ROLES:
            out.add(w if not w.isupper() else w.capitalize())
    return out


def eponym_follows(text: str, end: int, strong: bool = False) -> bool:
    """True when the word after `end` makes the name a thing ("Foley catheter", "Allen key"); `strong` as
    `_followed_by_thing` has it."""
    return _followed_by_thing(text, end, strong)
