"""The health document is the dump of one typed model (broker/health.py Health)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clawq.broker import Broker, Outcome
from clawq.broker.health import Health


def test_the_document_is_the_typed_report_dumped(broker: Broker) -> None:
    a = broker.add("web", "a", chain="coding")
    broker.add("api", "b", chain="coding")
    broker.complete(a, broker.claim().run_id, Outcome(summary="ok"))
    report = broker.health_report()
    assert isinstance(report, Health)
    doc = broker.health()
    assert list(doc) == ["global", "boards", "models", "usage", "providers", "recent_errors", "namespace",
                         "redis"]
    assert doc["boards"]["api"] == report.boards["api"].model_dump(mode="json")
    assert Health.model_validate(doc).doc() == doc  # the JSON document reads back into the model


def test_a_document_missing_a_field_is_not_a_health_document(broker: Broker) -> None:
    broker.add("web", "a", chain="coding")
    doc = broker.health()
    del doc["boards"]["web"]["why_waiting"]
    with pytest.raises(ValidationError, match="why_waiting"):
        Health.model_validate(doc)
