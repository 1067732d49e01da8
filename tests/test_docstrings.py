"""Every registered method carries a numpydoc docstring: a one-line summary (``lt-cls list``),
Parameters / Attributes / References / Examples in that order, a runnable example (run by
``--doctest-modules``, see pyproject.toml) and the defaults of its ``__init__``."""
import ast
import doctest
import inspect
import json
import re

import pytest

import classifiers

SECTIONS = ("Parameters", "Attributes", "References", "Examples")
# "name : type, default=value" or "a, b : default=1, 2" (the entry's names, then its defaults)
ENTRY = re.compile(r"^(\w+(?:, \w+)*)(?:, \.\.\.)? : (?:.*?, )?default=(.*)$")


def sections(doc: str) -> dict[str, list[str]]:
    """The lines of each numpydoc section (a title underlined with dashes), in order."""
    lines = inspect.cleandoc(doc).splitlines()
    found, current = {}, None
    for line, below in zip(lines, lines[1:] + [""]):
        if below and set(below) == {"-"} and len(below) == len(line):
            current = found.setdefault(line, [])
        elif current is not None and not set(line) <= {"-"}:
            current.append(line)
    return found


@pytest.mark.parametrize("name", list(classifiers.REGISTRY))
def test_docstring_has_the_numpydoc_sections_and_an_example(name):
    doc = classifiers.REGISTRY[name].__doc__
    summary, blank = inspect.cleandoc(doc).splitlines()[:2]
    assert summary.strip() and not blank, "one summary line, then a blank line"
    assert [title for title in sections(doc) if title in SECTIONS] == list(SECTIONS)
    examples = doctest.DocTestParser().get_examples(doc)
    assert examples and any(example.want for example in examples)


@pytest.mark.parametrize("name", list(classifiers.REGISTRY))
def test_documented_defaults_are_the_signatures(name):
    """An entry's defaults are the signature's; a cRT recipe may refer the parameters it leaves
    at cRT's defaults to ClassifierRetraining (or state one inline as ``loss="ldam"``)."""
    cls = classifiers.REGISTRY[name]
    defaults = cls.defaults()
    documented = set()
    for line in sections(cls.__doc__)["Parameters"]:
        match = ENTRY.match(line)
        if not match:
            continue
        names = match[1].split(", ")
        documented.update(names)
        try:
            values = ast.literal_eval(match[2])
        except (ValueError, SyntaxError):
            continue  # an expression such as 2**29
        if Ellipsis in (values if isinstance(values, tuple) else ()):
            continue  # a grid written as (0.0, 0.1, ..., 2.0)
        values = values if len(names) > 1 else (values,)
        assert dict(zip(names, values)) == {n: defaults[n] for n in names}, line
    crt_defaults = classifiers.REGISTRY["crt"].defaults()
    for param in set(defaults) - documented:
        assert ":class:`~classifiers.crt.ClassifierRetraining`" in cls.__doc__, f"{param} is undocumented"
        inline = f"``{param}={json.dumps(defaults[param])}``"
        assert defaults[param] == crt_defaults.get(param, ...) or inline in cls.__doc__, param
