"""docs/INTERFACES.md says what octssl/vocab.py defines: every vocabulary name it lists, with the value it gives."""

from __future__ import annotations

import re
from pathlib import Path

from octssl import vocab

DOC = Path(__file__).resolve().parents[1] / "docs" / "INTERFACES.md"


def _vocabulary_section() -> str:
    text = DOC.read_text()
    start = text.index("## Vocabulary (`octssl.vocab`)")
    return text[start : text.index("\n## ", start + 1)]


def test_interfaces_vocabulary_names_and_values_match_vocab_py() -> None:
    section = _vocabulary_section()
    named = re.findall(r"`([A-Z][A-Z0-9_]+)` \(([^)]*)\)", section)
    assert named, "the vocabulary section names no constants"
    for name, given in named:
        assert hasattr(vocab, name), f"INTERFACES.md names {name}, which octssl/vocab.py does not define"
        value = getattr(vocab, name)
        values = {value} if isinstance(value, str) else set(value) if isinstance(value, tuple) else None
        if values is not None:
            quoted = set(re.findall(r"`([a-z0-9_]+)`", given))
            assert quoted == values, f"INTERFACES.md gives {name} as {sorted(quoted)}, vocab.py as {sorted(values)}"


def test_interfaces_primary_metrics_match_vocab_py() -> None:
    section = _vocabulary_section()
    for kind, metric in vocab.PRIMARY_METRIC.items():
        assert f"{kind} `{metric}`" in section, f"INTERFACES.md does not give {kind}'s primary metric as {metric!r}"
    stated = re.findall(r"(reconstruction|segmentation) `([a-z0-9_]+)`", section)
    assert stated and all(vocab.PRIMARY_METRIC[k] == m for k, m in stated)
