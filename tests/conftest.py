"""Fixtures shared by every test: `lab` (see labkit.Lab) and a session-wide leak check that fails the
run if a `mesh-` namespace, an `mh` link or a `mesh` nftables table is left behind.
"""
from __future__ import annotations

import pytest

from labkit import Lab, leftovers


@pytest.fixture(scope="session", autouse=True)
def no_leaks():
    before = leftovers()
    yield
    left = leftovers() - before
    assert not left, f"kernel objects left behind by the test run: {sorted(left)}"


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
