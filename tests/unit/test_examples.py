"""Every stack in examples/ loads without errors or warnings (users run them as they are)."""
from pathlib import Path

import pytest

from mesh.spec import load_stack_file

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "single-host.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_cleanly(path):
    stack = load_stack_file(str(path))
    assert stack.services and stack.warnings == ()
