"""The checks every config section's ``validate`` is written with.

A failed check raises ``ValueError("<dotted field> must be <rule>, got <value>")``, so that an
error always names the field to change: ``rl.group_size must be >= 2 (...), got 1``. A section
validator makes one :class:`Checker` with its prefix ("data", "rl.sglang", …) and names fields
relative to it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable
from urllib.parse import urlsplit

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an ``int`` to Python, never to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_url(value: Any, *, needs_port: bool = False) -> bool:
    """An http(s) URL with a host (and, with ``needs_port``, an explicit port and no path)."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if needs_port:
        return port is not None and parts.path in ("", "/") and not parts.query and not parts.fragment
    return True


def is_env_name(value: Any) -> bool:
    """The name of an environment variable (letters, digits, _), or empty."""
    return isinstance(value, str) and (value == "" or ENV_NAME.fullmatch(value) is not None)


class Checker:
    """``check(cond, field, rule, value)`` with ``field`` relative to the section's prefix."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def name(self, field: str) -> str:
        return f"{self.prefix}.{field}" if self.prefix and field else (field or self.prefix)

    def fail(self, field: str, message: str) -> None:
        """Raise ``ValueError("<prefix.field> <message>")`` for rules that are not "must be X"."""
        raise ValueError(f"{self.name(field)} {message}")

    def __call__(self, cond: bool, field: str, rule: str, value: Any) -> None:
        if not cond:
            raise ValueError(f"{self.name(field)} must be {rule}, got {value!r}")

    def secret(self, cond: bool, field: str, rule: str) -> None:
        """Like a check, but the value is never echoed (it may be a key pasted by mistake)."""
        if not cond:
            raise ValueError(f"{self.name(field)} must be {rule}; got a value that is not one (not shown)")

    def one_of(self, value: Any, field: str, choices: Iterable) -> None:
        choices = tuple(choices)
        self(value in choices, field, f"one of {choices}", value)

    def boolean(self, value: Any, field: str) -> None:
        self(isinstance(value, bool), field, "a bool", value)

    def integer(self, value: Any, field: str, minimum: int | None = None, rule: str | None = None) -> None:
        """An int (not a bool) >= ``minimum`` when one is given."""
        ok = is_int(value) and (minimum is None or value >= minimum)
        self(ok, field, rule or ("an int" if minimum is None else f"an int >= {minimum}"), value)

    def number(self, value: Any, field: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, rule: str | None = None) -> None:
        """A finite number in the interval given (closed unless ``*_open``)."""
        ok = is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if rule is None:
            if low is not None and high is not None:
                rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                rule = f"{'>' if low_open else '>='} {low}"
            elif high is not None:
                rule = f"{'<' if high_open else '<='} {high}"
            else:
                rule = "a finite number"
        self(ok, field, rule, value)


__all__ = ["Checker", "ENV_NAME", "is_env_name", "is_int", "is_number", "is_url"]
