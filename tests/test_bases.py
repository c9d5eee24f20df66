"""The one option schema (Param) every component kind declares its options with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from auditor.bases import Detector, Param, parse_options
from auditor.errors import UsageError


def test_values_from_the_command_line_and_from_python_convert_alike() -> None:
    assert Param("n", 1, "", int).convert("7", "x") == 7
    assert Param("n", 1, "", int).convert(7.0, "x") == 7
    assert Param("r", 0.5, "", float).convert("0.25", "x") == 0.25
    assert Param("flag", False, "", bool).convert("yes", "x") is True
    assert Param("flag", False, "", bool).convert("off", "x") is False
    assert Param("p", None, "", Path).convert("a/b", "x") == Path("a/b")
    assert Param("c", "a", "", choices=("a", "b")).convert("b", "x") == "b"
    assert Param("n", None, "", int).convert(None, "x") is None


@pytest.mark.parametrize(
    ("param", "value", "words"),
    [
        (Param("n", 1, "", int), "many", "must be an integer"),
        (Param("n", 1, "", int), 2.5, "must be an integer"),
        (Param("n", 1, "", int, minimum=1), "0", "must be an integer >= 1"),
        (Param("p", 0.5, "", float, minimum=0, maximum=1, open=True), "1", "must be a number strictly between 0 and 1"),
        (Param("q", 0.5, "", float, minimum=0, maximum=1, open=True), "nan", "must be a number strictly between 0"),
        (Param("flag", False, "", bool), "maybe", "must be true or false"),
        (Param("c", "a", "", choices=("a", "b")), "z", "must be one of a, b"),
    ],
)
def test_a_bad_value_names_the_owner_the_option_and_what_it_expects(param: Param, value: Any, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        param.convert(value, "my-detector")
    assert str(caught.value).startswith(f"my-detector: option {param.name} {words}")


def test_parse_options_fills_defaults_and_refuses_unknown_names() -> None:
    params = (Param("seed", 0, "", int), Param("fast_mode", False, "", bool))
    assert parse_options("a", params, {"fast-mode": "true"}) == {"seed": 0, "fast_mode": True}
    with pytest.raises(UsageError, match="a has no option 'speed'; its options: fast_mode, seed"):
        parse_options("a", params, {"speed": 1})


class Thresholded(Detector):
    id = "thresholded"
    params = (Param("threshold", 0.5, "", float, minimum=0, maximum=1),)

    def detect(self, suspect: Any, *, bundle: Any, context: Any) -> list[Any]:
        return []


def test_a_detector_reads_its_options_from_the_context_with_defaults() -> None:
    d = Thresholded()
    assert d.settings({}) == {"threshold": 0.5}
    assert d.settings({"options": {"threshold": "0.25"}}) == {"threshold": 0.25}
    with pytest.raises(UsageError, match="thresholded: option threshold"):
        d.settings({"options": {"threshold": 2}})
