"""CallableRef: user code named in a configuration."""

from __future__ import annotations

import pickle

import pytest

from fedshield.core.imports import CallableRef
from fedshield.errors import ConfigError


def test_a_file_reference_resolves_against_base_dir_and_pickles(tmp_path):
    (tmp_path / "mine.py").write_text("def build(k=2):\n    return k * 21\n")
    ref = CallableRef("mine.py:build", base_dir=tmp_path, what="model.factory")
    assert ref() == 42 and ref.path == tmp_path / "mine.py"
    again = pickle.loads(pickle.dumps(ref))
    assert again(k=1) == 21


def test_a_module_reference():
    assert CallableRef("math:floor")(2.5) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "must be 'path/to/file.py:function'"),
        ("file.py:", "must be 'path/to/file.py:function'"),
        ("missing.py:f", "not found"),
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
        ("math:nope", "has no 'nope'"),
        ("math:pi", "is a float, not a function"),
    ],
)
def test_bad_references_say_what_is_wrong(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        CallableRef(spec, base_dir=tmp_path).resolve()


def test_a_file_that_raises_on_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"running .*broken\.py.* failed: .*boom"):
        CallableRef("broken.py:f", base_dir=tmp_path).resolve()
