"""Small name -> builder registries (timm-style), so configs never import strings.

An unknown name is a user error whose message lists the names that exist.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A config named something no registry entry has (a ValueError, so pydantic reports it with its key path)."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Any:
        """`reg.register("x", obj)` or as a decorator `@reg.register("x")`."""
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj
        return add(entry) if entry is not None else add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
ENCODERS: Registry[Callable[..., Any]] = Registry("encoder")
DECODERS: Registry[Callable[..., Any]] = Registry("decoder")
METHODS: Registry[Any] = Registry("method")


def load_all() -> None:
    """Import the modules that fill the registries (cheap: heavy libraries load inside builders)."""
    import trainers.data  # noqa: F401
    import trainers.methods  # noqa: F401
    import trainers.models  # noqa: F401
