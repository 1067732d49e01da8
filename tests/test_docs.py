"""Docs that must match the code."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_cli_docs import render
    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run `make docs-cli`"


def test_readme_quick_start_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", readme, re.S)
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_methods_doc_lists_every_registered_method():
    from classifiers import REGISTRY
    doc = (ROOT / "docs" / "methods.md").read_text()
    for name in REGISTRY:
        assert f"`{name}`" in doc
