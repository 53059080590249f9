"""The options every command shares: lists split on commas, numbers after a flag collected,
and only the options given reach the config."""

from __future__ import annotations

import pytest
import typer

from notsure.options import floats, given, split


def test_numbers_after_the_flag_are_collected() -> None:
    assert floats([0.05], ["0.1", "0.2", "0.3"], "--eps") == (0.05, 0.1, 0.2, 0.3)
    assert floats(None, [], "--eps") is None  # the config's default applies
    with pytest.raises(typer.BadParameter, match="only numbers may follow --eps"):
        floats([0.1], ["mnist"], "--eps")


def test_lists_split_on_commas_and_repeats() -> None:
    assert split(["a,b", " c "]) == ("a", "b", "c")
    assert split(None) is None
    assert split([" , "]) is None


def test_only_options_given_are_kept() -> None:
    assert given(n=7, url=None, offline=False, eps=()) == {"n": 7, "offline": False, "eps": ()}
