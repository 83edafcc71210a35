import re
from pathlib import Path

import pytest

from layerfuse._optional import is_available, require


def test_require_imports_installed_module():
    assert require("json", extra="none", purpose="a test").dumps([]) == "[]"
    assert is_available("json")


def test_require_names_the_extra():
    assert not is_available("layerfuse_no_such_module")
    with pytest.raises(ImportError, match=r"plotting needs the optional dependency 'layerfuse_no_such_module'.*"
                                          r"install the extra 'analysis' with: pip install '\.\[analysis\]' in the layerfuse checkout"):
        require("layerfuse_no_such_module", extra="analysis", purpose="plotting")


def test_no_install_advice_that_the_package_index_cannot_follow():
    # layerfuse is not on the package index: `pip install 'layerfuse[hf]'` finds nothing, so no
    # message, docstring or page may tell a user to run it (install_hint says what works).
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py"),
             *(root / "examples").glob("*.py")]
    advice = re.compile(r"pip install [\"']?layerfuse\[")
    offenders = [f"{f.relative_to(root)}:{n}" for f in files
                 for n, line in enumerate(f.read_text().splitlines(), 1) if advice.search(line)]
    assert offenders == []
