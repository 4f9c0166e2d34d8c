"""User code named in a configuration: ``"file.py:name"`` or ``"pkg.mod:name"``.

A :class:`CallableRef` is a picklable reference to a function the user wrote
(a model factory, a data loader). It stores only the text of the reference
and the folder relative paths resolve against, and imports the code on first
call, so process and Ray workers can receive it and import it themselves.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedshield.errors import ConfigError

__all__ = ["CallableRef"]


class CallableRef:
    """A reference to a callable: ``"path/to/file.py:name"`` or ``"pkg.mod:name"``.

    Parameters
    ----------
    spec
        ``"<file>.py:<name>"`` (a path, relative to ``base_dir`` unless
        absolute) or ``"<module>:<name>"`` (an importable dotted module).
    base_dir
        Folder a relative file path resolves against (the config file's).
    what
        What the reference is for, used in error messages (e.g.
        ``"model.factory"``).

    Raises
    ------
    ConfigError
        On :meth:`resolve` (or the first call): the text is malformed, the
        file or module is missing or fails to import, the name is missing or
        not callable.

    Examples
    --------
    >>> ref = CallableRef("math:sqrt", what="example")
    >>> ref(16.0)
    4.0
    """

    __slots__ = ("_resolved", "base_dir", "spec", "what")

    def __init__(
        self, spec: str, *, base_dir: Path | str | None = None, what: str = "factory"
    ) -> None:
        self.spec = str(spec)
        self.base_dir = str(base_dir) if base_dir is not None else None
        self.what = what
        self._resolved: Callable[..., Any] | None = None
        self._split()  # a malformed reference is refused at once

    def _split(self) -> tuple[str, str]:
        target, sep, name = self.spec.rpartition(":")
        if not sep or not target or not name.isidentifier():
            raise ConfigError(
                f"{self.what} must be 'path/to/file.py:function' or "
                f"'package.module:function'; got {self.spec!r}"
            )
        return target, name

    @property
    def path(self) -> Path | None:
        """The file the reference names (resolved), or None for a module."""
        target, _ = self._split()
        if not target.endswith(".py"):
            return None
        path = Path(target).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path.resolve()

    def resolve(self) -> Callable[..., Any]:
        """Import the file or module and return the named callable."""
        if self._resolved is not None:
            return self._resolved
        target, name = self._split()
        path = self.path
        if path is not None:
            module = _import_file(path, self.what)
            where = str(path)
        else:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as err:
                raise ConfigError(
                    f"{self.what} = {self.spec!r}: module {target!r} not found "
                    f"({err}); give a path ending in .py or an importable module"
                ) from None
            except Exception as err:
                raise ConfigError(
                    f"{self.what} = {self.spec!r}: importing {target!r} failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
            where = f"module {target!r}"
        try:
            value = getattr(module, name)
        except AttributeError:
            public = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_")
            )
            raise ConfigError(
                f"{self.what} = {self.spec!r}: {where} has no {name!r} "
                f"(callables there: {', '.join(public) or 'none'})"
            ) from None
        if not callable(value):
            raise ConfigError(
                f"{self.what} = {self.spec!r}: {name!r} in {where} is a "
                f"{type(value).__name__}, not a function"
            )
        function: Callable[..., Any] = value
        self._resolved = function
        return function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the referenced callable (importing it on first use)."""
        return self.resolve()(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "base_dir": self.base_dir, "what": self.what}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self.base_dir = state["base_dir"]
        self.what = state["what"]
        self._resolved = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallableRef) and (self.spec, self.path) == (
            other.spec,
            other.path,
        )

    def __hash__(self) -> int:
        return hash((self.spec, self.path))

    def __repr__(self) -> str:
        return f"CallableRef({self.spec!r})"


def _import_file(path: Path, what: str) -> Any:
    """Import a Python file once per process, under a name derived from its path."""
    if not path.is_file():
        raise ConfigError(f"{what}: file {str(path)!r} not found")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module_name = f"_fedshield_user_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{what}: cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(spec)
    # Registered before running, so classes defined in the file pickle by
    # reference within this process (and the file is run once).
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ConfigError(
            f"{what}: running {str(path)!r} failed: {type(err).__name__}: {err}"
        ) from err
    return module
