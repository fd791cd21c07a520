"""The base of the runner's small value objects (a request, a job, a peer, a run's outcome).

Not dataclasses: `import dataclasses` imports `inspect` (and with it `ast`, `dis`, `tokenize`), and
each @dataclass execs generated code when its module is imported; together about 8 ms on every
connection, before the job can start. A class with `__slots__` and a plain `__init__` costs nothing.
Treat them as frozen: nothing assigns to a field after `__init__`.
"""

from __future__ import annotations


class Value:
    """Fields are the subclass's `__slots__`; equality, hash and repr follow from them."""

    __slots__: tuple[str, ...] = ()

    def fields(self) -> dict[str, object]:
        """The fields by name, in declaration order (like `dataclasses.asdict` for flat objects)."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self.__slots__))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"
