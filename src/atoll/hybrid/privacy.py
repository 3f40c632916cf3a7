"""The on-device privacy detector: finds personal data in a prompt before anything leaves the device.

Detection uses maintained libraries that work offline:
- phone numbers: ``phonenumbers`` (Google's libphonenumber), matches that are valid numbers of
  their region (default ``privacy.phone_region``; numbers written with +CC anywhere);
- postal addresses: ``pyap2`` (US, Canadian and British address patterns);
- ID numbers: ``python-stdnum`` validators (``privacy.id_formats``: check digits and formats);
- card numbers: 13–19 digits starting 2–6 that pass the Luhn check (``stdnum.luhn``);
- e-mail addresses: a regular expression (local@domain.tld; no library detects them better in free text);
- names: a gazetteer of the first and last names Faker ships for its English locales (8,603 first,
  5,333 last) plus ``privacy.names``, with three rules: a title (Mr, Mrs, Ms, Miss, Mx, Dr, Prof)
  or an introduction ("my name is", "I am", "I'm", "call me", "this is") before a capitalised word;
  a known first name followed by a capitalised word; a known first name on its own, except as the
  first word of a sentence or line ("Will you ...", "May I ..."). It misses names outside the lists
  and flags common words that are names (Grant, Rose): it errs toward keeping prompts on the device.

Policies (``privacy.policy``): ``edge_only`` (a prompt with findings never reaches the cloud; the
edge answers alone), ``redact`` (the cloud sees the prompt with each finding replaced by a
placeholder such as ``[EMAIL]``; copies of a finding in the generated text are masked too), ``off``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from functools import lru_cache

from atoll.errors import ConfigError
from atoll.hybrid.config import PrivacyConfig

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_NUMBER_RUN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]*\d[A-Za-z0-9]*(?:[ .-][A-Za-z0-9]+)*")
_CARD = re.compile(r"(?<!\d)[2-6]\d{3}(?:[ -]?\d){9,15}(?!\d)")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")
_TITLES = {"Mr", "Mrs", "Ms", "Miss", "Mx", "Dr", "Prof"}
_INTRODUCTIONS = re.compile(r"\b(?:my name is|i am|i'm|call me|this is)\s+$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?:^|[.!?:;\n]\s*|\n)$")


@dataclass(frozen=True)
class Finding:
    kind: str  # person, email, phone, address, id_number, card_number
    start: int
    end: int
    text: str


@lru_cache(maxsize=1)
def _gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    """First and last names from Faker's English-locale person providers (ASCII, alphabetic)."""
    import faker.providers.person as people

    firsts: set[str] = set()
    lasts: set[str] = set()
    for module in pkgutil.iter_modules(people.__path__):
        if not module.name.startswith("en"):
            continue
        provider = importlib.import_module(f"{people.__name__}.{module.name}").Provider
        for attribute, into in (
            ("first_names", firsts),
            ("first_names_male", firsts),
            ("first_names_female", firsts),
            ("last_names", lasts),
        ):
            value = next((klass.__dict__[attribute] for klass in provider.__mro__ if attribute in klass.__dict__), None)
            if isinstance(value, (dict, list, tuple, set, frozenset)):
                into.update(name for name in value if isinstance(name, str) and name.isascii() and name.isalpha())
    return frozenset(firsts), frozenset(lasts)


class PrivacyDetector:
    """Finds personal data of the configured kinds in a text, and redacts it."""

    def __init__(self, config: PrivacyConfig | None = None):
        self.config = config or PrivacyConfig()
        self.kinds = set(self.config.entities)
        self.id_validators = []
        for name in self.config.id_formats:
            try:
                module = importlib.import_module(f"stdnum.{name}")
            except ImportError:
                raise ConfigError(
                    f"privacy.id_formats: python-stdnum has no module '{name}'", "use names like us.ssn, iban, es.dni, fr.nir"
                ) from None
            self.id_validators.append(module.is_valid)
        self.first_names, self.last_names = _gazetteer() if "person" in self.kinds else (frozenset(), frozenset())
        self.extra_names = {n.strip() for n in self.config.names if n.strip()}

    # -- detection -------------------------------------------------------------------------------
    def find(self, text: str) -> list[Finding]:
        """Every finding, overlaps merged (the longer span wins), in text order."""
        found: list[Finding] = []
        if "email" in self.kinds:
            found += [Finding("email", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]
        if "card_number" in self.kinds:
            found += self._cards(text)
        if "id_number" in self.kinds:
            found += self._ids(text)
        if "phone" in self.kinds:
            found += self._phones(text)
        if "address" in self.kinds:
            found += self._addresses(text)
        if "person" in self.kinds:
            found += self._people(text)
        return _merge(found)

    def _cards(self, text: str) -> list[Finding]:
        from stdnum import luhn

        hits = []
        for match in _CARD.finditer(text):
            digits = re.sub(r"\D", "", match.group())
            if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
                hits.append(Finding("card_number", match.start(), match.end(), match.group()))
        return hits

    def _ids(self, text: str) -> list[Finding]:
        hits = []
        for run in _NUMBER_RUN.finditer(text):
            pieces = [(m.start() + run.start(), m.end() + run.start()) for m in re.finditer(r"[A-Za-z0-9]+", run.group())]
            for first in range(len(pieces)):
                for last in range(len(pieces) - 1, first - 1, -1):
                    start, end = pieces[first][0], pieces[last][1]
                    candidate = text[start:end]
                    if any(ch.isdigit() for ch in candidate) and any(_valid(check, candidate) for check in self.id_validators):
                        hits.append(Finding("id_number", start, end, candidate))
                        break
        return hits

    def _phones(self, text: str) -> list[Finding]:
        import phonenumbers

        return [
            Finding("phone", m.start, m.end, m.raw_string) for m in phonenumbers.PhoneNumberMatcher(text, self.config.phone_region.upper())
        ]

    def _addresses(self, text: str) -> list[Finding]:
        import pyap

        hits = []
        for country in self.config.address_countries:
            for address in pyap.parse(text, country=country.upper()):
                start, end = address.match_start, address.match_end
                while end > start and text[end - 1].isspace():
                    end -= 1
                hits.append(Finding("address", start, end, text[start:end]))
        return hits

    def _people(self, text: str) -> list[Finding]:
        hits = []
        words = list(_WORD.finditer(text))
        for index, word in enumerate(words):
            name = word.group()
            if not name[0].isupper():
                continue
            before = text[: word.start()]
            previous = words[index - 1].group() if index else ""
            following = words[index + 1] if index + 1 < len(words) else None
            next_is_capital = (
                following is not None and following.group()[0].isupper() and text[word.end() : following.start()].strip() == ""
            )
            cued = (previous in _TITLES and text[words[index - 1].end() : word.start()].strip() in ("", ".")) or bool(
                _INTRODUCTIONS.search(before)
            )
            known = name in self.first_names or name in self.extra_names
            sentence_start = bool(_SENTENCE_END.search(before))
            if not (cued or (known and (next_is_capital or not sentence_start))):
                continue
            end = word.end()
            if next_is_capital and (following.group() in self.last_names or known or cued):
                end = following.end()
            hits.append(Finding("person", word.start(), end, text[word.start() : end]))
        for extra in self.extra_names:  # listed names match anywhere, also as the first word
            for match in re.finditer(rf"\b{re.escape(extra)}\b", text):
                hits.append(Finding("person", match.start(), match.end(), match.group()))
        return hits

    # -- redaction -------------------------------------------------------------------------------
    def redact(self, text: str, findings: list[Finding] | None = None) -> str:
        findings = self.find(text) if findings is None else findings
        pieces, cursor = [], 0
        for finding in findings:
            pieces.append(text[cursor : finding.start])
            pieces.append(placeholder(finding.kind))
            cursor = finding.end
        pieces.append(text[cursor:])
        return "".join(pieces)


def placeholder(kind: str) -> str:
    return f"[{kind.upper()}]"


def _valid(check, candidate: str) -> bool:
    try:
        return bool(check(candidate))
    except Exception:  # a validator that chokes on odd input simply does not match
        return False


def _merge(findings: list[Finding]) -> list[Finding]:
    """Overlapping findings become one span with the kind of the longest."""
    merged: list[Finding] = []
    for finding in sorted(findings, key=lambda f: (f.start, -(f.end - f.start))):
        if merged and finding.start < merged[-1].end:
            last = merged[-1]
            if finding.end > last.end:
                kind = last.kind if (last.end - last.start) >= (finding.end - finding.start) else finding.kind
                merged[-1] = Finding(kind, last.start, finding.end, "")
            continue
        merged.append(finding)
    return merged


class CloudView:
    """What the cloud may see of one prompt and its continuation under a policy: None for edge-only
    (the prompt stays on the device), else the text with every protected string masked."""

    def __init__(self, detector: PrivacyDetector, policy: str, prompt: str):
        self.findings = detector.find(prompt) if policy != "off" else []
        self.kept_on_device = policy == "edge_only" and bool(self.findings)
        self.redacted = policy == "redact" and bool(self.findings)
        self.prompt = None if self.kept_on_device else detector.redact(prompt, self.findings) if self.redacted else prompt
        self.protected = sorted({prompt[f.start : f.end] for f in self.findings}, key=len, reverse=True)
        self.kinds = {prompt[f.start : f.end]: f.kind for f in self.findings}

    def text(self, continuation: str) -> str | None:
        """The text sent for the next position: the (redacted) prompt plus the continuation, with
        full copies of protected strings masked and a tail that is starting to copy one cut off."""
        if self.prompt is None:
            return None
        if not self.protected:
            return self.prompt + continuation
        for secret in self.protected:
            continuation = continuation.replace(secret, placeholder(self.kinds[secret]))
        for secret in self.protected:
            for length in range(min(len(secret) - 1, len(continuation)), 2, -1):
                if continuation.endswith(secret[:length]):
                    continuation = continuation[:-length]
                    break
        return self.prompt + continuation
