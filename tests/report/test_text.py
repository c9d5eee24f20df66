"""The report's number formats: probabilities from their exact log10 (a power of ten when tiny, never 0),
floats only where a float holds them, keys in numeric order."""

from __future__ import annotations

import math
import sys

import pytest

from auditor.report.text import TIMES, exact_float, fmt, natural_key, power_of_ten, sorted_items


@pytest.mark.parametrize(
    ("log10", "shown"),
    [
        (0.0, "1"),
        (math.log10(0.984), "0.984"),
        (-3.0, "0.001"),
        (-3.01, f"9.8{TIMES}10^-4"),
        (-71.94446260382743, f"1.1{TIMES}10^-72"),
        (-308.0, "10^-308"),
        (-328.37, f"4.3{TIMES}10^-329"),  # below the smallest float: a float would say 0
        (-330.51993765016675, f"3{TIMES}10^-331"),
        (-1233.0, "10^-1233"),
        (-7.99999999, "10^-8"),  # 9.99... rounds up to the next power, not to "10 x 10^-9"
        (-1e6, "10^-1000000"),
    ],
)
def test_a_probability_is_written_from_its_log10(log10: float, shown: str) -> None:
    assert power_of_ten(log10) == shown


def test_a_probability_is_never_written_as_0() -> None:
    for log10 in (-307.6, -323.3, -324.0, -328.0, -400.0, -5000.0):
        assert not power_of_ten(log10).startswith("0"), log10
    assert power_of_ten(float("-inf")) == "0 (exactly)"  # an impossible outcome is the one true 0
    assert power_of_ten(None) == power_of_ten(float("nan")) == power_of_ten(True) == "—"


def test_a_float_is_kept_only_where_it_holds_the_probability() -> None:
    assert exact_float(-300.0) == pytest.approx(1e-300, rel=1e-12)
    assert exact_float(-307.0) == pytest.approx(1e-307, rel=1e-12)
    for log10 in (-308.0, -323.3, -328.37, -400.0):  # a denormal (5e-324 at worst) or 0 would pretend
        assert exact_float(log10) is None, log10
    assert exact_float(0.0) == 1.0
    assert sys.float_info.min == 2.2250738585072014e-308


def test_fmt_never_writes_an_underflowed_p_value_as_0() -> None:
    for key in ("binomial_p", "combined_p", "p_value", "min_forging_bound"):
        assert fmt(5e-324, key) == fmt(0.0, key) == "below 10^-308 (see its log10)"
    assert fmt(0.0, "k") == "0"
    assert fmt(5e-324, "weight") == "4.941e-324"  # not a probability: the number as it is


def test_keys_that_are_numbers_sort_as_numbers() -> None:
    factors = {str(i): float(i) for i in (0, 1, 10, 100, 2, 20, 3)} | {"note": "x", "-1": 1.0}
    assert [k for k, _ in sorted_items(factors)] == ["-1", "0", "1", "2", "3", "10", "20", "100", "note"]
    assert fmt({"10": 1.5, "2": 0.5, "b": 1}) == "2=0.5, 10=1.5, b=1"
    assert natural_key(3) < natural_key("10") < natural_key("nan") < natural_key("x")
