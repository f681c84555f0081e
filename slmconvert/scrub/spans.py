"""Detected spans, and the rules that join, widen and add to what the recognisers and spaCy found.

spaCy's small English model finds most names in running text but misses rare ones, names in lists,
speakers of a dialogue and the addressee above an address, and cuts addresses into pieces; these
rules, each guarded against real words, fill those gaps. `engine.Scrubber` applies them per text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import regex

NER_SCORE = 0.85  # what Presidio's SpacyRecognizer gives spaCy entities
# Any script's letters ("Jožef Pušaver", "Szczepańska"); inner capitals for "McConnan", "DeShawn".
NAME_TOKEN = regex.compile(r"^(?!.*['’](?:m|ll|re|ve|d|t)$)\p{Lu}[\p{L}'’\-]*\p{Ll}$|^\p{Lu}\.?$")  # not "I'm"

_GAP = re.compile(r"^[\s,.\-]{0,8}$")
_LEADING_NUMBER = re.compile(r"(?<![\w.,:/-])\d{1,6}[ \t]+$")
# Lines after a street line: city, region, country, postcode, each after a comma or a line break.
_ADDRESS_TAIL = regex.compile(r"(?:[ \t]*[,\n][ \t\n>]*(?:\p{Lu}[\w'’.\-]*(?:[ \t]+[\p{Lu}(][\w'’.\-)]*){0,3}(?:[ \t]+\d{4,6}(?:-\d{4})?)?"
                           r"|[A-Z]{2}(?:[ \t]+\d{4,6})?|\d{4,6}(?:-\d{4})?|[A-Z]\d[A-Z] ?\d[A-Z]\d)(?=[ \t]*(?:[,\n]|$))){1,4}")
_POSTAL_TAIL = re.compile(r"^[\s,]{1,3}(?:[A-Z]{2}\s+)?(\d{4,6}(?:-\d{4})?|[A-Z]\d[A-Z] ?\d[A-Z]\d)\b")


@dataclass(frozen=True, slots=True)
class Detection:
    start: int
    end: int
    entity: str
    score: float


NOT_A_PERSON_WORDS = {
    "inc", "corp", "corporation", "ltd", "llc", "plc", "gmbh", "group", "company", "co", "technologies", "technology",
    "systems", "solutions", "bank", "university", "college", "school", "institute", "airlines", "airways", "air",
    "hotel", "hotels", "city", "county", "state", "republic", "kingdom", "island", "islands", "river", "lake",
    "mount", "street", "avenue", "road", "park", "center", "centre", "hospital", "clinic", "foundation", "partners",
    "holdings", "international", "services", "media", "labs", "studio", "studios", "north", "south", "east", "west",
    "new", "san", "santa", "saint", "st", "fort", "port", "united", "national", "federal", "the", "of", "and", "&",
    "club", "country", "weekly", "daily", "news", "magazine", "journal", "times", "post", "review", "records", "band",
    "orchestra", "society", "association", "council", "committee", "agency", "museum", "library", "theatre", "theater",
    "church", "stadium", "airport", "market", "markets", "mall", "store", "shop", "cafe", "restaurant", "bar", "pub",
    "terminal", "gate", "station", "harbour", "harbor", "bridge", "tower", "building", "hall", "arena", "palace",
}


def looks_like_person(span: str, entity: str = "ORGANIZATION") -> bool:
    """spaCy's small model often labels a rare name ("Tomomi Nishiyama", "Sandra") an organisation or a place.

    An "organisation" of two or three name-like words is a person; so is a one-word one that is a
    common first name (US census list). A "place" is a person only as first name + surname ("Steffen
    Mauer"): a city in an agent log is operational ("Las Vegas", "Charlotte" stay)."""
    tokens = span.split()
    if not tokens or not all(NAME_TOKEN.match(t) for t in tokens) or any(t.lower().strip(".") in NOT_A_PERSON_WORDS for t in tokens):
        return False
    first, last = (re.sub(r"['’\-]", "", t).lower() for t in (tokens[0], tokens[-1]))
    names = census_names()
    if entity == "ORGANIZATION":  # ("Chicago O'Hare": the scrubber's place-word guard keeps it)
        return (2 <= len(tokens) <= 3) or (len(tokens) == 1 and first in names.common_first)
    return 2 <= len(tokens) <= 3 and first in names.first and last in names.last


@dataclass(frozen=True)
class _CensusNames:
    first: frozenset
    common_first: frozenset
    last: frozenset


@functools.cache
def census_names() -> _CensusNames:
    """US Census 1990 name frequency lists, shipped in the `names` package (MIT; public-domain data)."""
    from importlib.resources import files

    def read(name: str, max_rank: int | None = None) -> frozenset:
        rows = (line.split() for line in files("names").joinpath(name).read_text().splitlines() if line.strip())
        return frozenset(r[0].lower() for r in rows if max_rank is None or int(r[3]) <= max_rank)

    first = read("dist.male.first") | read("dist.female.first")
    common = read("dist.male.first", 400) | read("dist.female.first", 800)
    return _CensusNames(first, common, read("dist.all.last", 20000))


def resolve(dets: list[Detection]) -> list[Detection]:
    """Non-overlapping detections: higher score first, then longer. Overlapping address
    detections are one address ("28245 Puruntie 82" by one pattern, "Puruntie 82 Apt. 59" by another)."""
    addresses: list[Detection] = []
    for d in sorted((d for d in dets if d.entity == "STREET_ADDRESS"), key=lambda d: d.start):
        if addresses and d.start < addresses[-1].end:
            a = addresses[-1]
            addresses[-1] = Detection(a.start, max(a.end, d.end), a.entity, max(a.score, d.score))
        else:
            addresses.append(d)
    dets = [d for d in dets if d.entity != "STREET_ADDRESS"] + addresses
    out: list[Detection] = []
    for d in sorted(dets, key=lambda d: (-d.score, -(d.end - d.start), d.start)):
        if all(d.end <= o.start or d.start >= o.end for o in out):
            out.append(d)
    return sorted(out, key=lambda d: d.start)


_LIST_NAME = r"\p{Lu}[\p{L}'’\-]+(?:[ ]\p{Lu}\.?)?(?:[ ]\p{Lu}[\p{L}'’\-]+)?"
_NAME_LIST = regex.compile(rf"(?<![\p{{L}}\-])({_LIST_NAME})((?:(?:,[ ]|,?[ ](?:and|or|&)[ ])(?:{_LIST_NAME}))+)(?![\p{{L}}\-])")
_CONJUNCTION = re.compile(r"[ ](?:and|or|&)[ ]")
_INTERJECTIONS = {"sure", "thanks", "thank", "hi", "hello", "hey", "dear", "yes", "no", "ok", "okay", "well", "please", "sorry",
                  "great", "perfect", "bye", "goodbye", "welcome", "congratulations", "cheers", "alright", "right", "certainly"}
_LIST_ITEM = regex.compile(rf"(?:,[ ]|,?[ ](?:and|or|&)[ ])({_LIST_NAME})")


def coordinated_names(text: str, dets: list[Detection]) -> list[Detection]:
    """Capitalised words listed with a person are people too: in "Gaetane, Hannah, Derek and
    Anna" or "Marrero and Murphy", spaCy's small model finds one or two of them at most."""
    people = [d for d in dets if d.entity == "PERSON"]
    if not people:
        return dets
    added: list[Detection] = []
    for m in _NAME_LIST.finditer(text):
        items = [(m.start(1), m.end(1))] + [(x.start(1), x.end(1)) for x in _LIST_ITEM.finditer(text, m.start(2), m.end(2))]
        # A list has a conjunction: "Sure, Ivan." is a reply and a name, not two people.
        if not _CONJUNCTION.search(m.group(2)) or not any(p.start < e and s < p.end for s, e in items for p in people):
            continue
        items = [(s, e) for s, e in items if text[s:e].lower() not in _INTERJECTIONS]
        for s, e in items:
            overlapping = [d for d in dets if d.start < e and s < d.end]
            if all(d.entity in ("ORGANIZATION", "LOCATION") and d.score <= NER_SCORE for d in overlapping):
                dets = [d for d in dets if d not in overlapping]
                added.append(Detection(s, e, "PERSON", NER_SCORE))
    return dets + added


_NAME_LINE = regex.compile(r"^[ \t>]*(?:(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ \t]+)?(?:[\p{L} ]+:[ \t]*)?"
                           r"(\p{Lu}[\p{L}'’\-]+(?:[ \t]+\p{Lu}\.?)?(?:[ \t]+\p{Lu}[\p{L}'’\-]+){1,2})[ \t]*$", regex.MULTILINE)
_SPEAKER = regex.compile(r"^[ \t>]*(\p{Lu}\p{Ll}+):[ \t]*[\"“]?(?=[^\s\d+(])", regex.MULTILINE)  # a speaker says words
# Line labels of transcripts, headers and prompts, never speakers' names.
_LABEL_WORDS = {
    "user", "assistant", "system", "human", "ai", "agent", "customer", "client", "bot", "tool", "function", "note", "notes",
    "question", "answer", "input", "output", "example", "context", "summary", "error", "warning", "response", "request",
    "result", "observation", "thought", "action", "subject", "from", "to", "cc", "date", "re", "fwd", "sent", "name",
    "address", "phone", "email", "title", "status", "reason", "task", "goal", "instructions", "rules", "policy", "step",
    "tip", "hint", "important", "caution", "info", "debug", "source", "reference", "translation", "query", "reply",
    "moderator", "host", "guest", "interviewer", "speaker", "caller", "operator", "support", "admin", "me", "you",
    "mobile", "desk", "fax", "tel", "cell", "home", "work", "office", "website", "web", "url", "where", "when", "who",
    "what", "why", "how", "location", "time", "price", "total", "description", "comment", "comments", "feedback", "ps",
}


def addressee_names(text: str, dets: list[Detection]) -> list[Detection]:
    """A line holding only a name, within two lines before an address, is the addressee:
    "Ella H. Snider\nOtc Markets\n228 Ringvej 144" (letters, signatures, shipping labels)."""
    out = []
    for d in dets:
        if d.entity != "STREET_ADDRESS":
            continue
        cut = d.start
        for _ in range(3):  # back to the start of the line two lines above the address's own line
            cut = text.rfind("\n", 0, cut)
            if cut < 0:
                break
        for m in _NAME_LINE.finditer(text, cut + 1, d.start):
            start, end = m.span(1)
            if all(end <= o.start or start >= o.end for o in dets) and all(NAME_TOKEN.match(t) for t in m.group(1).split()):
                out.append(Detection(start, end, "PERSON", NER_SCORE))
    return out


def speaker_names(text: str, dets: list[Detection]) -> list[Detection]:
    """Speakers of a dialogue: two or more different "Name:" line labels that are no label words."""
    found = [m for m in _SPEAKER.finditer(text) if m.group(1).lower() not in _LABEL_WORDS]
    if len({m.group(1) for m in found}) < 2:
        return []
    return [Detection(m.start(1), m.end(1), "PERSON", NER_SCORE) for m in found
            if all(m.end(1) <= o.start or m.start(1) >= o.end for o in dets)]


def merge_addresses(text: str, dets: list[Detection]) -> list[Detection]:
    """One detection per address: the street line grown by its building number and the city, region,
    country and postal code lines after it, joined with the places and postcodes NER found in it."""
    grown = []
    for d in dets:
        if d.entity == "STREET_ADDRESS":
            lead = _LEADING_NUMBER.search(text, 0, d.start)  # "17151 2450 Crown St"
            tail = _POSTAL_TAIL.match(text[d.end:]) or _ADDRESS_TAIL.match(text[d.end:])
            d = Detection(lead.start() if lead else d.start, d.end + (tail.end() if tail else 0), d.entity, d.score)
        grown.append(d)
    out: list[Detection] = []
    for d in sorted(grown, key=lambda d: (d.start, -d.end)):
        prev = out[-1] if out else None
        if prev is not None and prev.entity == "STREET_ADDRESS":
            # spaCy calls a bare postcode a date ("Hungary 18695"): in or after an address it is the postcode.
            part = d.entity in ("STREET_ADDRESS", "LOCATION", "ZIP_CODE") or (d.entity == "DATE_TIME" and text[d.start:d.end].isdigit())
            if (d.start < prev.end and (part or d.end <= prev.end)) or (part and _GAP.match(text[prev.end:d.start])):
                out[-1] = Detection(prev.start, max(prev.end, d.end), "STREET_ADDRESS", max(prev.score, d.score))
                continue
        out.append(d)
    return out
