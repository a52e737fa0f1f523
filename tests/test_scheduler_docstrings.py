"""The examples in the schedulers' docstrings run and print what they say."""

import doctest

import pytest

from hf_ext.schedulers import scheduling_reflow, scheduling_udm


@pytest.mark.parametrize("module", [scheduling_reflow, scheduling_udm], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
