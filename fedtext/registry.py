"""Name -> implementation tables, one per family (server optimizers, aggregators, samplers...).

Each family keeps its table beside its implementations and registers them by name, so the
config checks, the CLI's choices and the builders all read the same table: a new aggregator
is one decorated function, not an edit in four places.

    SERVER_OPTIMIZERS = Registry("server optimizer")

    @SERVER_OPTIMIZERS.register("adam")
    def _adam(cfg): ...

    SERVER_OPTIMIZERS["adam"]       # the builder; an unknown name is a FedtextError that
    SERVER_OPTIMIZERS.names         # lists the choices (and the closest one)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fedtext.errors import FedtextError


class Registry(Mapping):
    """An ordered, read-mostly mapping from names to implementations."""

    def __init__(self, family: str):
        self.family = family  # for error messages: "unknown server optimizer 'adamw'"
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Callable:
        """Add `obj` under `name`; used bare (`register(name, obj)`) or as a decorator."""

        def add(o):
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def check(self, name: str, what: str | None = None) -> str:
        """`name` if registered, else a FedtextError naming the choices."""
        if name not in self._items:
            near = difflib.get_close_matches(str(name), self.names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise FedtextError(f"{what or self.family} must be one of {', '.join(self.names)}, "
                               f"not {name!r}{hint}")
        return name

    def __getitem__(self, name: str):
        return self._items[self.check(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}: {', '.join(self.names)})"
