"""Parameter checks shared by the built-in plugins (errors name the parameter)."""
import math


def number(method: str, name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{method}: {name} must be a finite number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{method}: {name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{method}: {name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def choice(method: str, name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{method}: {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def flag(method: str, name: str, value) -> bool:
    # NB: a bool, not any truthy value: the string "False" (a config file read as text) would be True
    if not isinstance(value, bool):
        raise ValueError(f"{method}: {name} must be True or False, got {value!r}")
    return value
