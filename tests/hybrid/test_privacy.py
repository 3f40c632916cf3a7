"""The privacy detector finds planted personal data of each kind and leaves plain text alone."""

from __future__ import annotations

import pytest

from atoll.errors import ConfigError
from atoll.hybrid.config import PrivacyConfig
from atoll.hybrid.privacy import CloudView, PrivacyDetector

PLANTED = (
    "Hi, I'm Maria Gonzalez, call me at (415) 555-0132 or +44 20 7946 0958, or write to maria.gonzalez@example.com. "
    "I live at 1600 Amphitheatre Parkway, Mountain View, CA 94043. Card 4111 1111 1111 1111, SSN 123-45-6789, "
    "IBAN GB82 WEST 1234 5698 7654 32."
)
EXPECTED = {
    ("person", "Maria Gonzalez"),
    ("phone", "(415) 555-0132"),
    ("phone", "+44 20 7946 0958"),
    ("email", "maria.gonzalez@example.com"),
    ("address", "1600 Amphitheatre Parkway, Mountain View, CA 94043"),
    ("card_number", "4111 1111 1111 1111"),
    ("id_number", "123-45-6789"),
    ("id_number", "GB82 WEST 1234 5698 7654 32"),
}


@pytest.fixture(scope="module")
def detector() -> PrivacyDetector:
    return PrivacyDetector()


def test_every_planted_kind_is_found(detector):
    found = {(f.kind, PLANTED[f.start : f.end]) for f in detector.find(PLANTED)}
    assert found == EXPECTED


def test_redaction_leaves_no_planted_value(detector):
    redacted = detector.redact(PLANTED)
    for _, value in EXPECTED:
        assert value not in redacted
    assert "[EMAIL]" in redacted and "[PERSON]" in redacted and "[CARD_NUMBER]" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "What is this text about? rain storm the forecast",
        "Will you walk with me, good my lord? The year 2024 had 365 days; version 3.10.4 is out.",
        "Order 12 apples and 4 pears for 7.50 each.",
    ],
)
def test_plain_text_has_no_findings(detector, text):
    assert detector.find(text) == []


def test_name_rules(detector):
    def people(text: str) -> list[str]:
        return [text[f.start : f.end] for f in detector.find(text) if f.kind == "person"]

    assert people("Please ask Mary about it.") == ["Mary"]  # a known first name mid-sentence
    assert people("Mary, please come.") == []  # alone at the start of a sentence: ambiguous, not flagged
    assert people("Mary Smith called.") == ["Mary Smith"]
    assert people("My name is Zxqvort.") == ["Zxqvort"]  # unknown name after an introduction
    assert people("I met Dr. Okonkwo today.") == ["Okonkwo"]
    listed = PrivacyDetector(PrivacyConfig(names=["Bartholomew"], entities=["person"]))
    assert [f.kind for f in listed.find("Bartholomew sends his regards.")] == ["person"]


def test_only_configured_kinds_are_detected():
    emails_only = PrivacyDetector(PrivacyConfig(entities=["email"]))
    assert {f.kind for f in emails_only.find(PLANTED)} == {"email"}


def test_unknown_id_format_is_a_config_error():
    with pytest.raises(ConfigError, match="no module 'xx.nothing'"):
        PrivacyDetector(PrivacyConfig(id_formats=["xx.nothing"]))


def test_cloud_view_policies(detector):
    prompt = "Email maria.gonzalez@example.com about the rain."
    assert CloudView(detector, "edge_only", prompt).text("") is None
    assert CloudView(detector, "off", prompt).text(" ok") == prompt + " ok"
    redacting = CloudView(detector, "redact", prompt)
    assert redacting.text("") == "Email [EMAIL] about the rain."
    # a continuation that copies the address is masked, and a copy in progress is held back
    assert redacting.text(" Sent to maria.gonzalez@example.com!") == "Email [EMAIL] about the rain. Sent to [EMAIL]!"
    assert redacting.text(" Sent to maria.gon") == "Email [EMAIL] about the rain. Sent to "
    clean = CloudView(detector, "edge_only", "What about the rain?")
    assert not clean.kept_on_device and clean.text(" It") == "What about the rain? It"
