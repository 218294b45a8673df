"""Config dataclasses, the same way everywhere: field validators for ``__post_init__`` and building a config
from a JSON-like dict.

Every refusal is one line in one style, ``NAME: expected WHAT, got VALUE; fix: HOW``, where NAME is the CLI flag
when the field has one (``--steps``; ``--batch (batch_size)`` when the field is spelled differently) and the
config's field otherwise (``BrecqOptions.iters_w``). Integers are Python ``int`` (``bool`` refused), reals are
``int``/``float`` (``bool`` and NaN refused, infinities too unless ``finite=False``): the values configs are made
of, straight from argparse or JSON.

Why not pydantic or attrs: the configs are frozen stdlib dataclasses whose dicts are saved beside artifacts and
read back by :func:`config_from_dict`; both libraries would add a dependency (pydantic also coerces ``"5"`` to 5
and words its errors its own way, attrs' validators raise ``TypeError``/``ValueError`` without the flag) and the
deployment layers (``runtime``, ``engines``) import this module, so it stays standard library only.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any, Optional, TypeVar

from tdqrt.engines.errors import ConfigError

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """A Python integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any, *, finite: bool = True) -> bool:
    """An int or float that is not a bool nor NaN (nor infinite, with ``finite``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return False
    return math.isfinite(value) or not finite


def label(name: str, flag: Optional[str] = None) -> str:
    """How a message names a field: the flag, with the field name in parentheses when they are spelled apart."""
    if flag is None:
        return name
    field = name.rsplit(".", 1)[-1]
    return flag if flag.split()[-1].lstrip("-").replace("-", "_") == field else f"{flag} ({field})"


def invalid(name: str, value: Any, expected: str, fix: str, *, flag: Optional[str] = None) -> ConfigError:
    """The one refusal message: ``NAME: expected EXPECTED, got VALUE; fix: FIX`` (VALUE as ``repr``)."""
    return ConfigError(f"{label(name, flag)}: expected {expected}, got {value!r}; fix: {fix}")


def _range(minimum: Any, maximum: Any, above: Any, below: Any) -> str:
    low = f"[{minimum}" if minimum is not None else (f"({above}" if above is not None else None)
    high = f"{maximum}]" if maximum is not None else (f"{below})" if below is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {minimum}" if minimum is not None else f" > {above}"
    if high:
        return f" <= {maximum}" if maximum is not None else f" < {below}"
    return ""


def _in_range(v: Any, minimum: Any, maximum: Any, above: Any, below: Any) -> bool:
    return ((minimum is None or v >= minimum) and (maximum is None or v <= maximum)
            and (above is None or v > above) and (below is None or v < below))


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None, *,
              optional: bool = False, flag: Optional[str] = None, fix: Optional[str] = None) -> Optional[int]:
    """``value`` if it is an integer in ``[minimum, maximum]`` (None: unbounded; ``optional``: None passes too)."""
    if optional and value is None:
        return None
    if not is_int(value) or not _in_range(value, minimum, maximum, None, None):
        expected = f"an integer{_range(minimum, maximum, None, None)}" + (" or None" if optional else "")
        raise invalid(name, value, expected, fix or f"give an integer{_range(minimum, maximum, None, None)}",
                      flag=flag)
    return value


def check_real(name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None, *,
               above: Optional[float] = None, below: Optional[float] = None, finite: bool = True,
               optional: bool = False, flag: Optional[str] = None, fix: Optional[str] = None) -> Optional[float]:
    """``float(value)`` if it is a real number in range: ``minimum``/``maximum`` are inclusive bounds,
    ``above``/``below`` exclusive ones; ``finite=False`` lets ±inf through (``optional``: None passes too)."""
    if optional and value is None:
        return None
    if not is_real(value, finite=finite) or not _in_range(value, minimum, maximum, above, below):
        span = _range(minimum, maximum, above, below)
        kind = "a finite number" if finite else "a number"
        raise invalid(name, value, f"{kind}{span}" + (" or None" if optional else ""),
                      fix or f"give a number{span}", flag=flag)
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any], *, flag: Optional[str] = None,
                 fix: Optional[str] = None) -> Any:
    """``value`` if it is one of ``choices``."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise invalid(name, value, f"one of {', '.join(map(str, choices))}", fix or "pick one of those", flag=flag)
    return value


def check_bool(name: str, value: Any, *, optional: bool = False, flag: Optional[str] = None) -> Optional[bool]:
    """``value`` if it is True or False (``optional``: None passes too)."""
    if not isinstance(value, bool) and not (optional and value is None):
        raise invalid(name, value, "true or false" + (" or None" if optional else ""), "give a boolean", flag=flag)
    return value


def check_text(name: str, value: Any, what: str, *, optional: bool = False,
               flag: Optional[str] = None) -> Optional[str]:
    """``value`` if it is a non-empty string (``what`` says what it names; ``optional``: None passes too)."""
    if optional and value is None:
        return None
    if not isinstance(value, str) or not value:
        raise invalid(name, value, f"a non-empty string ({what})", f"give {what}", flag=flag)
    return value


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
