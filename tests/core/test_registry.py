"""core.registry: the named container every family of parts is kept in."""

from __future__ import annotations

import pytest

from fedshield.core.registry import Entry, Registry
from fedshield.errors import ConfigError


@pytest.fixture
def shapes() -> Registry[int]:
    shapes: Registry[int] = Registry("shape", "[draw] shape")
    shapes.add("circle", 0, "round", tags={"smooth"})
    shapes.add("square", 4, "four sides", tags=("corners",))
    shapes.add("triangle", 3, tags=frozenset({"corners"}))
    return shapes


def test_names_keep_registration_order_and_filter_by_tag(shapes: Registry[int]):
    assert shapes.names() == ("circle", "square", "triangle")
    assert shapes.names(tag="corners") == ("square", "triangle")
    assert shapes.names(tag="nope") == ()
    assert list(shapes) == ["circle", "square", "triangle"]
    assert len(shapes) == 3
    assert "square" in shapes and "hexagon" not in shapes
    assert shapes.as_literal_values() == ("circle", "square", "triangle")


def test_entries_hold_value_description_and_tags(shapes: Registry[int]):
    assert shapes.get("square") == 4
    assert shapes.entry("circle") == Entry("circle", 0, "round", frozenset({"smooth"}))
    assert shapes.tags("triangle") == frozenset({"corners"})
    assert shapes.descriptions() == {
        "circle": "round",
        "square": "four sides",
        "triangle": "",
    }
    assert shapes.help() == "circle: round\nsquare: four sides\ntriangle"
    assert "circle" in repr(shapes)


def test_a_name_is_registered_once(shapes: Registry[int]):
    with pytest.raises(ValueError, match="shape 'circle' is already registered"):
        shapes.add("circle", 1)


def test_the_decorator_registers_and_returns_the_value():
    makers: Registry[object] = Registry("maker")

    @makers.register("double", "twice the input", tags=("math",))
    def double(x: int) -> int:
        return 2 * x

    assert makers.get("double") is double and double(2) == 4
    assert makers.names(tag="math") == ("double",)


def test_an_unknown_name_names_the_key_the_closest_name_and_the_choices(
    shapes: Registry[int],
):
    with pytest.raises(ConfigError) as info:
        shapes.get("squar")
    assert str(info.value) == (
        "[draw] shape: unknown shape 'squar' (did you mean 'square'?); "
        "choose one of: circle, square, triangle"
    )
    with pytest.raises(ConfigError, match=r"unknown shape 'zzz'"):
        shapes.tags("zzz")


def test_an_unrelated_name_gets_no_suggestion(shapes: Registry[int]):
    assert "did you mean" not in shapes.unknown("zzz")


def test_unknown_without_the_section_or_with_other_choices(shapes: Registry[int]):
    assert shapes.unknown("circel", with_section=False) == (
        "unknown shape 'circel' (did you mean 'circle'?); "
        "choose one of: circle, square, triangle"
    )
    assert shapes.unknown("nane", choices=("none", "circle")).endswith(
        "(did you mean 'none'?); choose one of: none, circle"
    )


def test_remove_unregisters(shapes: Registry[int]):
    removed = shapes.remove("square")
    assert removed.value == 4
    assert shapes.names() == ("circle", "triangle")
    with pytest.raises(ConfigError, match="unknown shape 'square'"):
        shapes.remove("square")
    shapes.add("square", 5)  # the name is free again
    assert shapes.names() == ("circle", "triangle", "square")
