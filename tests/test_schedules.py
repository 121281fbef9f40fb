"""Curriculum shapes at e = 0, E/2, E, and in between."""
import math

import pytest

from trainers.schedules import SHAPES, curriculum

E = 10
EXPECT = {   # f(0), f(E/2), f(E)
    "quadratic": (1.0, 0.25, 0.0),
    "linear": (1.0, 0.5, 0.0),
    "cosine": (1.0, 0.5, 0.0),
    "step": (1.0, 0.0, 0.0),
    "constant": (1.0, 1.0, 1.0),
}


@pytest.mark.parametrize("shape", sorted(EXPECT))
def test_values_at_start_middle_end(shape):
    got = tuple(curriculum(shape, e, E) for e in (0, E / 2, E))
    assert got == pytest.approx(EXPECT[shape])


@pytest.mark.parametrize("power", [0.5, 1.0, 3.0])
def test_power(power):
    assert curriculum("power", 0, E, power) == 1.0 and curriculum("power", E, E, power) == 0.0
    assert curriculum("power", E / 2, E, power) == pytest.approx(0.5 ** power)
    assert curriculum("power", 3, E, 2.0) == pytest.approx(curriculum("quadratic", 3, E))


@pytest.mark.parametrize("shape", SHAPES)
def test_monotone_in_unit_interval_and_clamped(shape):
    values = [curriculum(shape, e, E) for e in range(-2, E + 3)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert curriculum(shape, E + 5, E) == curriculum(shape, E, E)


def test_quadratic_is_the_papers_formula():
    for e in range(E + 1):
        assert curriculum("quadratic", e, E) == pytest.approx((1 - e / E) ** 2)
    assert curriculum("cosine", 2.5, E) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown curriculum shape 'expo'"):
        curriculum("expo", 0, E)
    with pytest.raises(ValueError, match="epochs must be positive"):
        curriculum("linear", 0, 0)
