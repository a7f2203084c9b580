"""Argument types shared by every command: each numeric option is range-checked where it is parsed,
and a bad value ends in one line naming the option (argparse: "argument --seed: ...", exit code 2).

    p.add_argument("--seed", type=SEED)
    p.add_argument("--n", type=count(1))
    p.add_argument("--lr", type=real(0, lo_open=True))
    p.add_argument("--val-fraction", type=real(0, 1, hi_open=True))
"""

from __future__ import annotations

import argparse
import json
import math

MAX_SEED = 2**32 - 1  # numpy and torch both take seeds in [0, 2^32)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ("calofm simulate: error: argument --n: ..."), exit 2,
    like a CalofmError; `--help` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, integer: bool):
    try:
        value = float(text) if not integer else int(text)
    except ValueError:
        if not integer:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:  # 2e8, 1e6: integers written the short way
            as_float = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        value = int(as_float)
    if not integer and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def count(lo: int = 0, hi: int | None = None):
    """An integer in [lo, hi]."""
    def parse(text: str) -> int:
        value = _number(text, integer=True)
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"within {lo}-{hi}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite number in the interval lo..hi (open ends where asked)."""
    def parse(text: str) -> float:
        value = _number(text, integer=False)
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo:g}")
            if hi is not None:
                parts.append(f"{'<' if hi_open else '<='} {hi:g}")
            raise argparse.ArgumentTypeError(f"must be {' and '.join(parts)}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


SEED = count(0, MAX_SEED)
THREADS = count(1, 4096)
POSITIVE = count(1)
NON_NEGATIVE = count(0)
LEARNING_RATE = real(0, 10, lo_open=True)
FRACTION = real(0, 1, hi_open=True)  # a share that must leave something: [0, 1)
PROBABILITY = real(0, 1, lo_open=True)  # (0, 1]
MIN_P = real(0, 1)


def listed(item, allow_empty: bool = False):
    """A comma-separated list of values of the type `item` (e.g. count(1)); at least one unless
    `allow_empty` ("" then means none)."""
    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts and not allow_empty:
            raise argparse.ArgumentTypeError(f"needs at least one value, got {text!r}")
        return [item(t) for t in parts]
    parse.__name__ = "list"
    return parse


def json_object(text: str) -> dict:
    """A JSON object ({...})."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"d_model\": 192}'")
    return value


def add_force(p, what: str = "the output") -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")
