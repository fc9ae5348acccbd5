"""One reader for boolean annotation values: the words, nothing guessed."""

from __future__ import annotations

import pytest

from shim.annotations import boolean
from shim.errors import InvalidArgument

KEY = "restore.criu-shim.io/lazy-pages"


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_the_two_words(value: str, expected: bool) -> None:
    assert boolean(KEY, value) is expected
    assert boolean(KEY, value, lenient=True) is expected


@pytest.mark.parametrize("value", ["TRUE", "True", " true", "false\n", "yes", "1", "0", ""])
def test_strict_refuses_anything_else_naming_key_and_value(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        boolean(KEY, value)
    assert KEY in caught.value.message and repr(value) in caught.value.message
    assert '"true" or "false"' in caught.value.message


@pytest.mark.parametrize(("value", "expected"), [("TRUE", True), (" False ", False), ("True\n", True)])
def test_lenient_takes_any_case_and_blanks(value: str, expected: bool) -> None:
    assert boolean(KEY, value, lenient=True) is expected


@pytest.mark.parametrize("value", ["yes", "1", "", "t rue"])
def test_lenient_still_refuses_other_words(value: str) -> None:
    with pytest.raises(InvalidArgument, match=repr(value).replace("\\", "\\\\")):
        boolean(KEY, value, lenient=True)
