"""Recognisers Presidio lacks for agent logs (secrets, street addresses), and an offline e-mail one.

All are Presidio `PatternRecognizer`s: they run without NLP artifacts, before NER.
"""

from __future__ import annotations

import base64
import binascii

import regex
from presidio_analyzer import Pattern, PatternRecognizer

_CASE = regex.MULTILINE  # case matters for these patterns (Presidio's default flags ignore it)


class AuthTokenRecognizer(PatternRecognizer):
    """Bearer tokens, JWTs, and HTTP basic credentials only when they decode to user:password."""

    def validate_result(self, pattern_text: str) -> bool | None:
        if pattern_text.startswith("eyJ"):
            return None
        try:
            decoded = base64.b64decode(pattern_text + "=" * (-len(pattern_text) % 4), validate=True).decode("utf-8")
            if ":" in decoded and decoded.isprintable():
                return True
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
        # an opaque token: long, and not a plain word ("Basic Connectivity", "Bearer Authentication")
        return None if len(pattern_text) >= 16 and not pattern_text.isalpha() else False


def secret_recognizers() -> list[PatternRecognizer]:
    return [
        PatternRecognizer(
            supported_entity="API_KEY", name="ApiKeyRecognizer", global_regex_flags=_CASE,
            patterns=[
                Pattern("anthropic", r"\bsk-ant-[A-Za-z0-9_\-]{20,}", 0.95),
                Pattern("openai", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}", 0.9),
                Pattern("aws_access_key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b", 0.9),
                Pattern("aws_secret_assignment", r"(?i:aws_?secret_?access_?key)[\"']?\s*[:=]\s*[\"']?\K[A-Za-z0-9/+=]{40}\b", 0.9),
                Pattern("github", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}\b", 0.95),
                Pattern("google", r"\bAIza[0-9A-Za-z_\-]{35}\b", 0.9),
                Pattern("slack", r"\bxox[abprs]-[A-Za-z0-9\-]{10,}\b", 0.9),
                Pattern("stripe", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b", 0.9),
                Pattern("huggingface", r"\bhf_[A-Za-z0-9]{30,}\b", 0.9),
            ],
        ),
        AuthTokenRecognizer(
            supported_entity="AUTH_TOKEN", name="AuthTokenRecognizer", global_regex_flags=_CASE,
            patterns=[
                Pattern("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0.95),
                Pattern("bearer", r"(?i:\bbearer)\s+\K[A-Za-z0-9\-._~+/]{16,}=*", 0.85),
                # "Authorization: Basic dXNlcjpwYXNz": base64 of user:password (validated below), not "Basic Connectivity"
                Pattern("basic", r"\b[Bb]asic[ ]+\K[A-Za-z0-9+/]{8,}={0,2}(?![\w+/=])", 0.6),
            ],
        ),
        PatternRecognizer(
            supported_entity="PRIVATE_KEY", name="PrivateKeyRecognizer", global_regex_flags=_CASE | regex.DOTALL,
            patterns=[Pattern("pem", r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z]+ )*PRIVATE KEY-----", 1.0)],
        ),
        PatternRecognizer(
            supported_entity="PASSWORD", name="PasswordRecognizer", global_regex_flags=_CASE,
            patterns=[
                # scheme://user:password@host  -> the password only
                Pattern("url_credentials", r"\b[a-z][a-z0-9+.\-]*://[^\s:/@]+:\K[^\s@/]+(?=@)", 0.9),
                # "password": "..."  /  password=...  /  pwd: ...
                Pattern("assignment", r"(?i:\b(?:password|passwd|pwd|pass|secret|client_secret)\b)[\"']?\s*[:=]\s*[\"']?\K[^\s\"',;&}]{4,}", 0.8),
            ],
        ),
    ]


# USPS Publication 28 street suffixes (primary names and common abbreviations) and a few British ones.
_STREET_TYPES = (
    r"Street|St|Streets|Avenue|Ave|Road|Rd|Roads|Boulevard|Blvd|Lane|Ln|Drive|Dr|Drives|Court|Ct|Courts|Way|Ways|Place|Pl|"
    r"Terrace|Ter|Circle|Cir|Circles|Parkway|Pkwy|Parkways|Square|Sq|Squares|Trail|Trl|Highway|Hwy|Crescent|Close|"
    r"Garden|Gardens|Grove|Groves|Row|Alley|Aly|Plaza|Loop|Run|Path|Pike|Ridge|Ridges|Heights|Hts|Hill|Hills|Park|Parks|"
    r"Walk|Walks|View|Views|Point|Points|Crossing|Xing|Crossroad|Crossroads|Station|Estate|Estates|Mews|Wharf|Quay|"
    r"Anex|Arcade|Bayou|Beach|Bend|Bluff|Bluffs|Bottom|Branch|Bridge|Brook|Brooks|Burg|Burgs|Bypass|Camp|Canyon|Cape|"
    r"Causeway|Center|Centers|Cliff|Cliffs|Club|Common|Commons|Corner|Corners|Course|Cove|Coves|Creek|Crest|Curve|Dale|"
    r"Dam|Divide|Expressway|Expy|Extension|Ext|Fall|Falls|Ferry|Field|Fields|Flat|Flats|Ford|Fords|Forest|Forge|Forges|"
    r"Fork|Forks|Fort|Freeway|Fwy|Gateway|Glen|Glens|Green|Greens|Harbor|Harbors|Haven|Hollow|Inlet|Island|Islands|Isle|"
    r"Junction|Junctions|Key|Keys|Knoll|Knolls|Lake|Lakes|Land|Landing|Light|Lights|Lock|Locks|Lodge|Mall|Manor|Manors|"
    r"Meadow|Meadows|Mill|Mills|Mission|Motorway|Mount|Mountain|Mountains|Neck|Orchard|Oval|Overpass|Pass|Passage|Pine|"
    r"Pines|Plain|Plains|Port|Ports|Prairie|Radial|Ramp|Ranch|Rapid|Rapids|Rest|River|Route|Rte|Shoal|Shoals|Shore|"
    r"Shores|Skyway|Spring|Springs|Spur|Spurs|Stravenue|Stream|Summit|Trace|Track|Trafficway|Tunnel|Turnpike|Underpass|"
    r"Union|Unions|Valley|Valleys|Viaduct|Village|Villages|Ville|Vista|Wall|Well|Wells"
)
_CAP = r"[A-ZÀ-ÖØ-Þ][A-Za-zÀ-ÖØ-öø-ÿ'\-]+"
_NOT_DATE_WORD = (r"(?!(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|January|February|March|April|June|July|August|"
                  r"September|October|November|December|Mon|Tue|Wed|Thu|Fri|Sat|Sun)\b)")
_NOT_SMALL_WORD = r"(?!(?i:and|or|to|of|for|the|in|on|at|by|with|from|per|is|are|was|x|am|pm|a|an)\b)"


def address_recognizer() -> PatternRecognizer:
    return PatternRecognizer(
        supported_entity="STREET_ADDRESS", name="StreetAddressRecognizer", global_regex_flags=_CASE,
        context=["address", "street", "live", "living", "moved", "ship", "deliver", "billing", "mailing"],
        patterns=[
            # 123 Main Street / 4 W. Elm Ave.
            Pattern("us_street", rf"\b\d{{1,6}}[A-Z]?\s+(?:[NSEW]\.?\s+)?(?:{_CAP}\s+){{0,3}}{_CAP}\s+(?:{_STREET_TYPES})\b\.?", 0.7),
            # 6750 Koskikatu 25 / 727 Gesterbyntie 68 (house number, street, number)
            # (short lower-case words allowed: "233 Erzsébet tér 19", "808 Kálmán Imre u. 12"; not "5 May 2024",
            # not across lines: "$1,008\n\nOption 3")
            Pattern("eu_street", rf"(?<![\d,.$€£])\b\d{{1,6}}[ \t]+{_NOT_DATE_WORD}{_NOT_SMALL_WORD}{_CAP}(?:[ \t]+{_NOT_SMALL_WORD}(?:{_CAP}|[a-zà-ÿ]{{1,4}}\.?)){{0,3}}[ \t]+\d{{1,4}}[A-Za-z]?\b", 0.55),
            # Street name followed by house number: Hauptstraße 12
            Pattern("street_suffix_de", r"\b[A-ZÀ-Þ][a-zà-ÿ]+(?:straße|strasse|gasse|weg|platz|allee|katu|tie|gatan|vägen|laan|straat|gade|vej)\s+\d{1,4}[a-z]?\b", 0.6),
            # "the corner of 11 Botley Road and Herceg Gateway": two streets
            Pattern("corner", rf"(?i:\bcorner of)\s+\K(?:\d{{1,6}}\s+)?{_CAP}(?:\s+(?:\d{{1,5}}\.?|{_CAP}|[a-z]{{1,4}}\.?)){{0,4}}"
                              rf"\s+and\s+(?:\d{{1,6}}\s+)?{_CAP}(?:\s+(?:\d{{1,5}}\.?|{_CAP})){{0,4}}", 0.6),
            # "lives at 255 Hersnapvej 18, Copenhagen" / "ship it to 12 Rue de la Paix": a number after an address cue
            Pattern("address_cue", r"(?i:\blives?\s+(?:at|on)|\baddress(?:\s+is)?\s*:?|\bship(?:ped)?\s+(?:it\s+)?to|\bdeliver(?:ed)?\s+(?:it\s+)?to|"
                                   r"\bsen[dt]\s+(?:it\s+)?to|\bmail(?:ed)?\s+(?:it\s+)?to|\bmeet\s+me\s+at)\s+\K\d{1,6}\s+\w[^\n.;!?()]{2,60}?(?=\s*(?:[.;!?()\n]|$))", 0.5),
            # Apt. 5 / Suite 300 / Unit 12B
            Pattern("unit", r"\b(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Room|Floor|Fl\.)\s*#?\s*\d{1,5}[A-Z]?\b", 0.5),
            # PO boxes and US military addresses
            Pattern("po_box", r"\b(?:P\.?\s?O\.?\s?Box|PSC\s+\d{4},?\s+Box)\s+\d{1,6}\b", 0.6),
            Pattern("military", r"\b(?:USNS|USNV|USS|USCGC)\s+[A-Z][a-z]+\s*\n?\s*FPO\s+A[AEP]\s+\d{5}\b|\bUnit\s+\d{4}\s+Box\s+\d{4}\s*\n?\s*DPO\s+A[AEP]\s+\d{5}\b", 0.8),
            # "City, ST 12345" after an address line
            Pattern("city_state_zip", rf"\b{_CAP}(?:\s+{_CAP})?,\s+[A-Z]{{2}}\s+\d{{5}}(?:-\d{{4}})?\b", 0.6),
        ],
    )


class LuhnNumberRecognizer(PatternRecognizer):
    """Card numbers of any issuer: 12-19 digits (optionally grouped) that pass the Luhn check.

    Presidio's CreditCardRecognizer knows the big issuers' prefixes only (no JCB 2131/1800,
    no 19-digit cards); 9 in 10 random numbers fail Luhn, so order ids rarely match.
    """

    def __init__(self) -> None:
        super().__init__(supported_entity="CREDIT_CARD", name="LuhnNumberRecognizer", global_regex_flags=_CASE,
                         patterns=[Pattern("luhn_number", r"(?<![\d-])\d(?:[ -]?\d){11,18}(?![\d-])", 0.5)],
                         context=["card", "credit", "debit", "visa", "mastercard", "amex"])

    def validate_result(self, pattern_text: str) -> bool:
        from slmconvert.scrub.surrogates import luhn_valid

        return luhn_valid(pattern_text)


_EXTENSION = r"(?:[ ]?(?:x|ext\.?|extension)[ ]?\d{1,6})?"
# A phone number's digits: optional country code or (area code), then 6-15 digits in groups.
_PHONE = r"\+?\(?\d[\d ().\-]{4,18}\d" + _EXTENSION


def context_recognizers() -> list[PatternRecognizer]:
    """Values identified by the words before them: "my name is X", "Phone: X", "ZIP: X"."""
    name = r"[A-ZÀ-Þ][\w'’\-]+(?:[ \t]+[A-Z](?:\.|(?=[ \t])))?(?:[ \t]+[A-ZÀ-Þ][\w'’\-]+){0,2}"
    return [
        PatternRecognizer(
            supported_entity="PERSON", name="NameContextRecognizer", global_regex_flags=_CASE,
            patterns=[Pattern("name_cue", r"(?i:\bmy name is|\bi am|\bi'm|\bname\s*:|\bdear|\bmr\.?|\bmrs\.?|\bms\.?|\bmiss|\bdr\.?|"
                                          r"\bprof\.?|\bdirected by:?|\bwritten by:?|\bsigned,?|\bregards,?|\bsincerely,?|\bthanks,?|"
                                          r"\bcontact person:?|\bcustomer:?|\bpassenger:?|\bnamed(?: (?:him|her|them|it))?|\bunder the name(?: of)?|"
                                          r"\b(?:people |they |friends |everyone )?call(?:s|ed)? me|"
                                          r"\b(?:first|last|family|given|middle|sur)[ ]?name(?: is)?[:?]?|\b(?:speak|talk)(?: to| with)|\bask for|"
                                          r"\bfounders?:?|\bmy (?:kid|son|daughter|child|wife|husband|partner|brother|sister|mother|father|mom|mum|"
                                          r"dad|friend|colleague|boss|manager|fianc[eé]e?|grand(?:mother|father|ma|pa|son|daughter)|aunt|uncle|"
                                          r"cousin|nephew|niece|assistant|doctor|lawyer),?)[ \t]*\n?[ \t]*\K" + name, 0.7),
                      # typed in lower case, after a cue that leaves no doubt: "my name is lena andersson"
                      Pattern("lower_name_cue", r"(?i:\bmy name is|\bname\s*:|\bpeople call me|\b(?:maiden|first|last|family|given|sur)[ ]?name is)"
                                                r"[ \t]+\K(?!(?:not|on|in|the|a|an|also|still|just|and|but|spelled|written)\b)"
                                                r"\p{Ll}[\p{Ll}'’\-]+(?:[ \t]+\p{Ll}\.?(?=[ \t]))?(?:[ \t]+(?!(?:and|or|but|from|in|at|on)\b)\p{Ll}[\p{Ll}'’\-]+){0,2}", 0.7)],
        ),
        PatternRecognizer(
            supported_entity="PHONE_NUMBER", name="PhoneContextRecognizer", global_regex_flags=_CASE,
            patterns=[
                # after a cue word: "Phone: 0490 39 07 81", "Desk: +1-903-140-4508x769", "not answering at 78 651 450"
                Pattern("phone_cue", r"(?i:\bphone|\btel\.?|\btelephone|\bcall(?: me)?(?: at| on)?|\bmobile|\bcell|\bfax|\bdesk|\boffice|"
                                     r"\bhome|\bwork|\blandline|\bwhatsapp|\bdial|\breach me at|\btext me at|\banswering at|\bnumber is|"
                                     r"\bregistered)[\s:#.]{0,6}\K" + _PHONE + r"\b", 0.6),
                # before a cue word: "655 437 108 office", "(37) 788-063-Office", "+447700 208 815-Fax"
                Pattern("phone_cue_after", _PHONE + r"(?=[\s\-]{0,2}\(?(?i:office|fax|mobile|cell|home|work|desk|phone|tel)\b)", 0.6),
                # an international number written with its country code: "+46 (0)8 928 571 38"
                Pattern("international", r"(?<![\w+])\+\d{1,3}[ .\-]?(?:\(0\)[ ]?)?\(?\d{1,4}\)?(?:[ .\-]?\d{2,4}){2,4}" + _EXTENSION + r"\b", 0.5),
                # North American 3-3-4 with any area code (phonenumbers rejects the unassigned ones), extension kept
                Pattern("nanp", r"(?<![\w+\-.])(?:\+?1[ .\-])?(?:\(\d{3}\)[ ]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}" + _EXTENSION + r"(?![\w\-])", 0.4),
            ],
        ),
        PatternRecognizer(
            supported_entity="ZIP_CODE", name="ZipContextRecognizer", global_regex_flags=_CASE,
            patterns=[Pattern("zip_cue", r"(?i:\bzip(?: code)?|\bpostal code|\bpostcode)(?:\s+is)?[\s:#]{0,4}\K(?:\d{3,5}(?:[ -]\d{2,4})?|[A-Z]\d[A-Z] ?\d[A-Z]\d)\b", 0.7)],
        ),
    ]


class AnyCaseIbanRecognizer(PatternRecognizer):
    """IBANs written in lower case ("my iban is gb42nawi0445..."), which Presidio's recogniser skips; mod-97 checked."""

    def __init__(self) -> None:
        super().__init__(supported_entity="IBAN_CODE", name="AnyCaseIbanRecognizer", global_regex_flags=_CASE,
                         patterns=[Pattern("iban_any_case", r"(?i)\b[a-z]{2}\d{2}(?:[ ]?[a-z0-9]{4}){2,7}(?:[ ]?[a-z0-9]{1,4})?\b", 0.5)])

    def validate_result(self, pattern_text: str) -> bool:
        from slmconvert.scrub.surrogates import iban_valid

        return iban_valid(pattern_text)


def _id_cue(entity: str, name: str, cue: str) -> PatternRecognizer:
    # "my driver's license number is F162823540116": a token with digits right after the cue
    return PatternRecognizer(
        supported_entity=entity, name=name, global_regex_flags=_CASE,
        patterns=[Pattern(f"{entity.lower()}_cue", rf"(?i:{cue})(?:\s+(?i:number|no\.?|#|id))?(?:\s+(?i:is|of))?[\s:#]{{0,4}}\K"
                                                   r"(?=[A-Za-z\-]*\d)[A-Za-z0-9][A-Za-z0-9\-]{3,20}[A-Za-z0-9]\b", 0.6)],
    )


def id_recognizers() -> list[PatternRecognizer]:
    """Identity-document numbers named by the words before them."""
    return [
        _id_cue("US_DRIVER_LICENSE", "DriverLicenseContextRecognizer", r"\bdriver'?s?\s+licen[cs]e|\bdriving\s+licen[cs]e|\blicen[cs]e"),
        _id_cue("US_PASSPORT", "PassportContextRecognizer", r"\bpassport"),
        # "MRN S6541353", "patient S6541353", "medical record number: 1234567"
        _id_cue("MEDICAL_RECORD_NUMBER", "MrnContextRecognizer",
                r"\bmrn|\bmedical\s+record(?:\s+number)?|\bpatient(?:\s+(?:id|identifier))?|\bPatient/"),
    ]


class OfflineEmailRecognizer(PatternRecognizer):
    """Presidio's e-mail pattern, validated against tldextract's bundled suffix list (no download)."""

    def __init__(self) -> None:
        import tldextract
        from presidio_analyzer.predefined_recognizers import EmailRecognizer

        stock = EmailRecognizer()
        super().__init__(supported_entity="EMAIL_ADDRESS", name="EmailRecognizer", patterns=stock.patterns, context=stock.context)
        self._extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str) -> bool:
        return self._extract(pattern_text).fqdn != ""


def structured_recognizers(entities: set[str]) -> list:
    """The pattern recognisers for the entities a policy acts on (no NLP needed)."""
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer, IbanRecognizer, IpRecognizer, PhoneRecognizer, UsSsnRecognizer,
    )

    candidates = [
        OfflineEmailRecognizer(),
        PhoneRecognizer(supported_regions=("US", "UK", "DE", "FR", "IT", "ES", "NL", "IL", "IN", "CA", "BR", "AU", "CH", "SE", "FI", "BE")),
        CreditCardRecognizer(),
        LuhnNumberRecognizer(),
        UsSsnRecognizer(),
        IbanRecognizer(),
        AnyCaseIbanRecognizer(),
        IpRecognizer(),
        address_recognizer(),
        *context_recognizers(),
        *id_recognizers(),
        *secret_recognizers(),
    ]
    return [r for r in candidates if set(r.supported_entities) & entities]
