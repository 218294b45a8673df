"""Building validated config dataclasses from JSON-like dicts, the same way everywhere."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from tdqrt.engines.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """``cls(**d)`` for a config dataclass, refusing unknown keys (typos, settings of another version) by name and
    naming required keys that are missing; the dataclass's own ``__post_init__`` then validates the values."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}; pass a dict.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__} got unknown key(s) {unknown}; allowed keys are {sorted(fields)}. "
                          "Remove or rename them.")
    missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING and n not in d)
    if missing:
        raise ConfigError(f"{cls.__name__} is missing required key(s) {missing}")
    return cls(**d)
