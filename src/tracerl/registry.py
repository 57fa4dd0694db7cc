"""One small registry helper, used by every name -> object table of the project.

A :class:`Registry` maps names (what ``params.yaml`` says) to objects (functions,
classes, declarations). Registering a name twice is an error, so two modules can never
silently shadow each other's entries, and looking up an unknown name lists the valid
ones, so a typo in params is a one-line fix.

Example:
    >>> colors = Registry("color")
    >>> @colors.register("red")
    ... def red():
    ...     return "#f00"
    >>> colors.get("red")()
    '#f00'
    >>> colors.names()
    ['red']
    >>> try:
    ...     colors.get("blue")
    ... except KeyError as e:  # also a ValueError
    ...     print(e.args[0])
    unknown color 'blue'; valid: red
    >>> colors.add("red", red)
    Traceback (most recent call last):
    ...
    ValueError: color 'red' is registered twice
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name no entry is registered under (a ``KeyError`` for lookups, a ``ValueError``
    for callers that treat it as a bad setting)."""


class Registry(Generic[T]):
    """Names to objects, with a duplicate-name guard and helpful lookup errors.

    Args:
        kind: what the entries are, for messages (``"curriculum policy"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name``; a second registration of ``name`` raises."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        """The entry ``name``; :class:`UnknownName` listing the valid names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def problem(self, name: str, where: str) -> str | None:
        """A params problem line when ``name`` is not registered (None when it is)."""
        if name in self._items:
            return None
        return f"{where} {name!r} is unknown; valid: {', '.join(self.names())}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
