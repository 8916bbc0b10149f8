"""Shared fixtures: T5 models of the public shapes with random weights (asked for explicitly).
Shared helpers are in tests/helpers.py and peftcore.testing."""

import copy

import pytest
from helpers import build_t5


@pytest.fixture
def tiny_t5():
    return build_t5("t5-tiny")


@pytest.fixture
def twin_tiny_t5():
    """Two identical tiny T5s: one for peftcore, one for the reference."""
    model = build_t5("t5-tiny")
    return model, copy.deepcopy(model)
