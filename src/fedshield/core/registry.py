"""Named registries: one place names each family of pluggable parts.

A :class:`Registry` maps a name (``"krum"``, ``"alie"``, ``"central"``,
``"ray"``, ``"digits"``) to an :class:`Entry`: the object that builds the part
and a one-line description. The config schema, the CLI's help, ``fedshield
analyze`` and the report read the names and descriptions from the registry,
so adding a part touches its module, one registration and its test.

Each layer keeps its own registries next to what they name (robust rules in
``fedshield.strategies``, attacks in ``fedshield.models``...); this module only
holds the generic container, so it imports nothing from the layers above.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fedshield.errors import ConfigError

__all__ = ["Entry", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part.

    Parameters
    ----------
    name
        The name users write (in TOML, on the command line).
    value
        What the name stands for: a class, a factory or an object.
    description
        One line for the CLI's help and the documentation.
    tags
        Free-form facts about the part that readers filter on (for example
        ``"needs_f"`` for a robust rule that takes the number of attackers).
    """

    name: str
    value: T
    description: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)


class Registry(Generic[T]):
    """An ordered mapping of names to :class:`Entry` values.

    Parameters
    ----------
    kind
        What the registry holds, as a user would say it (``"robust rule"``);
        used in error messages.
    section
        Where the name is written (``"[robust] rule"``); used in error
        messages.
    """

    def __init__(self, kind: str, section: str = "") -> None:
        self.kind = kind
        self.section = section
        self._entries: dict[str, Entry[T]] = {}

    def add(
        self,
        name: str,
        value: T,
        description: str = "",
        *,
        tags: frozenset[str] | set[str] | tuple[str, ...] = (),
    ) -> T:
        """Register ``value`` under ``name`` and return it.

        Raises
        ------
        ValueError
            If ``name`` is already registered (two parts cannot share a name).
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, value, description, frozenset(tags))
        return value

    def register(
        self, name: str, description: str = "", *, tags: tuple[str, ...] = ()
    ) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(value: T) -> T:
            return self.add(name, value, description, tags=tags)

        return decorate

    def entry(self, name: str) -> Entry[T]:
        """The entry named ``name``.

        Raises
        ------
        ConfigError
            If no part has that name; the message lists the known names and
            suggests the closest.
        """
        found = self._entries.get(name)
        if found is None:
            raise ConfigError(self.unknown(name))
        return found

    def get(self, name: str) -> T:
        """The value registered under ``name`` (see :meth:`entry`)."""
        return self.entry(name).value

    def remove(self, name: str) -> Entry[T]:
        """Unregister ``name`` and return its entry (for tests and plug-ins).

        Raises
        ------
        ConfigError
            If no part has that name (see :meth:`entry`).
        """
        found = self.entry(name)
        del self._entries[name]
        return found

    def unknown(
        self,
        name: object,
        *,
        with_section: bool = True,
        choices: Sequence[str] | None = None,
    ) -> str:
        """The message for a name that is not registered.

        ``with_section=False`` leaves out the ``section`` prefix, for a
        caller that names the key itself (the configuration's errors);
        ``choices``: the names offered, where the caller accepts others
        besides the registered ones (default: the registered names).

        Examples
        --------
        >>> rules = Registry("rule", "[robust]")
        >>> _ = rules.add("krum", object())
        >>> rules.unknown("krumm")
        "[robust]: unknown rule 'krumm' (did you mean 'krum'?); choose one of: krum"
        """
        where = f"{self.section}: " if self.section and with_section else ""
        offered = list(self._entries if choices is None else choices)
        close = difflib.get_close_matches(str(name), offered, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"{where}unknown {self.kind} {name!r}{hint}; "
            f"choose one of: {', '.join(offered)}"
        )

    def names(self, *, tag: str | None = None) -> tuple[str, ...]:
        """The registered names in registration order (those with ``tag``)."""
        return tuple(
            name
            for name, entry in self._entries.items()
            if tag is None or tag in entry.tags
        )

    def descriptions(self) -> Mapping[str, str]:
        """Each name's one-line description."""
        return {name: entry.description for name, entry in self._entries.items()}

    def tags(self, name: str) -> frozenset[str]:
        """The tags of ``name`` (see :meth:`entry`)."""
        return self.entry(name).tags

    def help(self) -> str:
        """``name: description`` lines, for a CLI's help text."""
        return "\n".join(
            f"{name}: {entry.description}" if entry.description else name
            for name, entry in self._entries.items()
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def as_literal_values(self) -> tuple[Any, ...]:
        """The names, for a schema's ``enum``."""
        return tuple(self._entries)
