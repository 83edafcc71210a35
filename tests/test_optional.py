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
