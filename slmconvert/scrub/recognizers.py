"""Recognisers Presidio lacks for agent logs (secrets, street addresses), and an offline e-mail one.

All are Presidio `PatternRecognizer`s: they run without NLP artifacts, before NER.
"""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

_CASE = regex.MULTILINE  # case matters for these patterns (Presidio's default flags ignore it)


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
        PatternRecognizer(
            supported_entity="AUTH_TOKEN", name="AuthTokenRecognizer", global_regex_flags=_CASE,
            patterns=[
                Pattern("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0.95),
                Pattern("bearer", r"(?i:\bbearer)\s+\K[A-Za-z0-9\-._~+/]{16,}=*", 0.85),
                Pattern("basic", r"(?i:\bbasic)\s+\K[A-Za-z0-9+/]{12,}={0,2}", 0.6),
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


_STREET_TYPES = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Ter|Circle|Cir|"
    r"Parkway|Pkwy|Square|Sq|Trail|Trl|Highway|Hwy|Crescent|Close|Gardens|Grove|Row|Alley|Plaza|Loop|Run|Path|Pike|"
    r"Ridge|Heights|Hill|Park|Walk|View|Point|Crossing|Station|Estates|Mews|Wharf|Quay"
)
_CAP = r"[A-ZÀ-ÖØ-Þ][A-Za-zÀ-ÖØ-öø-ÿ'\-]+"


def address_recognizer() -> PatternRecognizer:
    return PatternRecognizer(
        supported_entity="STREET_ADDRESS", name="StreetAddressRecognizer", global_regex_flags=_CASE,
        context=["address", "street", "live", "living", "moved", "ship", "deliver", "billing", "mailing"],
        patterns=[
            # 123 Main Street / 4 W. Elm Ave.
            Pattern("us_street", rf"\b\d{{1,6}}[A-Z]?\s+(?:[NSEW]\.?\s+)?(?:{_CAP}\s+){{0,3}}{_CAP}\s+(?:{_STREET_TYPES})\b\.?", 0.7),
            # 6750 Koskikatu 25 / 727 Gesterbyntie 68 (house number, street, number)
            Pattern("eu_street", rf"\b\d{{1,6}}\s+{_CAP}(?:\s+{_CAP})?\s+\d{{1,4}}[A-Za-z]?\b", 0.55),
            # Street name followed by house number: Hauptstraße 12
            Pattern("street_suffix_de", r"\b[A-ZÀ-Þ][a-zà-ÿ]+(?:straße|strasse|gasse|weg|platz|allee|katu|tie|gatan|vägen|laan|straat|gade|vej)\s+\d{1,4}[a-z]?\b", 0.6),
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


def context_recognizers() -> list[PatternRecognizer]:
    """Values identified by the words before them: "my name is X", "Phone: X", "ZIP: X"."""
    name = r"[A-ZÀ-Þ][\w'’\-]+(?:[ \t]+[A-Z](?:\.|(?=[ \t])))?(?:[ \t]+[A-ZÀ-Þ][\w'’\-]+){0,2}"
    return [
        PatternRecognizer(
            supported_entity="PERSON", name="NameContextRecognizer", global_regex_flags=_CASE,
            patterns=[Pattern("name_cue", r"(?i:\bmy name is|\bi am|\bi'm|\bname\s*:|\bdear|\bmr\.?|\bmrs\.?|\bms\.?|\bmiss|\bdr\.?|"
                                          r"\bprof\.?|\bdirected by:?|\bwritten by:?|\bsigned,?|\bregards,?|\bsincerely,?|\bthanks,?|"
                                          r"\bcontact person:?|\bcustomer:?|\bpassenger:?)[ \t]*\n?[ \t]*\K" + name, 0.7)],
        ),
        PatternRecognizer(
            supported_entity="PHONE_NUMBER", name="PhoneContextRecognizer", global_regex_flags=_CASE,
            patterns=[Pattern("phone_cue", r"(?i:\bphone|\btel\.?|\btelephone|\bcall(?: me)?(?: at| on)?|\bmobile|\bcell|\bfax|\breach me at|"
                                           r"\btext me at|\bnumber is)[\s:#.]{0,6}\K\+?\(?\d[\d ().\-]{4,18}\d\b", 0.6)],
        ),
        PatternRecognizer(
            supported_entity="ZIP_CODE", name="ZipContextRecognizer", global_regex_flags=_CASE,
            patterns=[Pattern("zip_cue", r"(?i:\bzip(?: code)?|\bpostal code|\bpostcode)[\s:#]{0,4}\K(?:\d{3,5}(?:[ -]\d{2,4})?|[A-Z]\d[A-Z] ?\d[A-Z]\d)\b", 0.7)],
        ),
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
        IpRecognizer(),
        address_recognizer(),
        *context_recognizers(),
        *secret_recognizers(),
    ]
    return [r for r in candidates if set(r.supported_entities) & entities]
