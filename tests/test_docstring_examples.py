"""The `Examples:` of every public docstring run and print what they show.

The API pages render these `>>>` lines as the first code a user copies; they are checked like the
examples in `examples/`, module by module, with the package's public names in scope.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest
import torch

import layerfuse

# Docstrings whose examples need a download (a Hugging Face text encoder by name).
NEEDS_NETWORK = {"layerfuse.text.TextEmbedder"}

MODULES = sorted(info.name for info in pkgutil.walk_packages(layerfuse.__path__, "layerfuse."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:  # a module of a missing optional dependency
        pytest.skip(str(err))
    public = {attr: getattr(layerfuse, attr) for attr in layerfuse.__all__}
    failures = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        if test.name in NEEDS_NETWORK or getattr(test, "filename", None) != module.__file__:
            continue  # a docstring is checked once, in the module that defines it
        test.globs = {**public, "torch": torch, **vars(module)}
        torch.manual_seed(0)
        report = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        if runner.run(test, out=report.write).failed:
            failures.append(report.getvalue())
    assert not failures, "\n".join(failures)
