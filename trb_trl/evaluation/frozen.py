"""Immutable, picklable metadata for problems and verdicts: nested dicts, lists and sets frozen, and back."""

from collections.abc import Iterator, Mapping


class FrozenMapping(Mapping):
    """A read-only mapping whose nested dicts, lists and sets are frozen too (dicts to `FrozenMapping`, lists to
    tuples); picklable and hashable when its values are, unlike `types.MappingProxyType`."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | None = None):
        object.__setattr__(self, "_data", {key: freeze(value) for key, value in dict(data or {}).items()})

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name, value):
        raise AttributeError("FrozenMapping is read-only")

    def __reduce__(self):
        return FrozenMapping, (self._data,)

    def __repr__(self) -> str:
        return f"FrozenMapping({self._data!r})"


def freeze(value):
    """`value` with its dicts, lists and sets made immutable (nested ones included)."""
    if isinstance(value, FrozenMapping):
        return value
    if isinstance(value, Mapping):
        return FrozenMapping(value)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(item) for item in value)
    return value


def thaw(value):
    """`value` as plain JSON-ready data: mappings to dicts, tuples and sets to lists (the inverse of `freeze`)."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [thaw(item) for item in value]
    return value
