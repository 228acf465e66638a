"""The CDS Hooks 2.0 rules for a discovery response and a card (specification sections
"Discovery" and "Card Attributes"), checked in Python: what cds-validator's schemas
(written for an earlier draft, see README.md here) cannot check for 2.0."""

from __future__ import annotations

INDICATORS = ("info", "warning", "critical")
LINK_TYPES = ("absolute", "smart")


def check_discovery(body: dict) -> None:
    assert isinstance(body.get("services"), list)
    for s in body["services"]:
        for field in ("hook", "description", "id"):
            assert isinstance(s.get(field), str) and s[field], f"service without {field}"
        assert isinstance(s.get("title", ""), str)
        prefetch = s.get("prefetch", {})
        assert isinstance(prefetch, dict) and all(isinstance(v, str) for v in prefetch.values())


def check_card(card: dict) -> None:
    assert isinstance(card.get("summary"), str) and len(card["summary"]) < 140, card.get("summary")
    assert card.get("indicator") in INDICATORS
    assert isinstance(card.get("detail", ""), str)
    assert isinstance(card.get("uuid", ""), str)
    source = card.get("source")
    assert isinstance(source, dict) and isinstance(source.get("label"), str) and source["label"]
    for field in ("url", "icon"):
        assert field not in source or str(source[field]).startswith(("http://", "https://"))
    topic = source.get("topic")
    assert topic is None or isinstance(topic, dict)
    for link in card.get("links", []):
        assert isinstance(link.get("label"), str) and isinstance(link.get("url"), str)
        assert link.get("type") in LINK_TYPES
        assert "appContext" not in link or link["type"] == "smart"
    if card.get("suggestions"):
        assert card.get("selectionBehavior") in ("at-most-one", "any")
    for reason in card.get("overrideReasons", []):
        assert reason.get("display"), "override reasons need a display"
