"""Under CI=true a missing tool fails the tests that need it instead of skipping them."""

from __future__ import annotations

import pytest


def test_a_missing_kustomize_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    """CI cannot pass by skipping the ~40 manifest tests: without kubectl/kustomize, CI=true fails them."""
    from .conftest import TARGETS, render

    monkeypatch.setenv("PATH", str(tmp_path))  # neither tool can be found
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and neither kustomize nor kubectl"):
        render(TARGETS["base"])
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        render(TARGETS["base"])
