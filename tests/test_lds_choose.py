import pytest

from course_lib import lds


def test_choose_takes_the_highest_and_the_first_on_a_tie():
    assert lds.choose({0.1: 0.2, 1.0: 0.5, 10.0: 0.3}) == 1.0
    assert lds.choose({"a": 0.4, "b": 0.4}) == "a"


def test_choose_refuses_an_empty_dict():
    with pytest.raises(ValueError):
        lds.choose({})
