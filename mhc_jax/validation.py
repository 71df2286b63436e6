"""Config validation: every field has a rule (its type, range or allowed values) and the relations
between fields are listed; both tables are in mhc_jax/config_rules.py.

`check(config)` runs before anything is written and raises a UserError naming the first bad field,
its value and what is allowed. A field without a rule is a bug of the table, reported the same way,
so a new config field cannot go unchecked (tests/test_configs.py tries a bad value for every field).
"""

import math
from dataclasses import dataclass

from mhc_jax.errors import UserError


def flat(fields, prefix: str = "") -> dict:
    """A config (ConfigDict or nested dicts) as {dotted field name: value}: {'moe': {'top_k': 8}} ->
    {'moe.top_k': 8}."""
    out = {}
    for name, value in fields.items():
        out.update(flat(value, f"{prefix}{name}.") if hasattr(value, "items") else {prefix + name: value})
    return out


@dataclass(frozen=True)
class Number:
    """An int (or a float, where `kind` is float) in [low, high]; `above` / `below` make the low /
    high end open; `special` values are allowed outside the range (e.g. -1: 'what is left')."""
    kind: type = int
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    special: tuple = ()

    def problem(self, value) -> str | None:
        kinds = (int, float) if self.kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return self.allowed()
        if value in self.special:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return self.allowed()
        too_low = self.low is not None and (value <= self.low if self.above else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.below else value > self.high)
        return self.allowed() if too_low or too_high else None

    def allowed(self) -> str:
        name = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            name += f" in {'(' if self.above else '['}{self.low:g}, {self.high:g}{')' if self.below else ']'}"
        elif self.low is not None:
            name += f" {'>' if self.above else '>='} {self.low:g}"
        elif self.high is not None:
            name += f" {'<' if self.below else '<='} {self.high:g}"
        return " or ".join([*map(str, self.special), name])

    def bad_values(self) -> list:
        bad = ["1x"]
        if self.low is not None:
            bad.append(self.low if self.above else self.low - 1)
        if self.high is not None:
            bad.append(self.high if self.below else self.high + 1)
        if self.kind is float:
            bad.append(math.nan)
        return [v for v in bad if v not in self.special]


@dataclass(frozen=True)
class Choice:
    """One of `values`."""
    values: tuple

    def problem(self, value) -> str | None:
        return None if value in self.values and type(value) is type(self.values[0]) else self.allowed()

    def allowed(self) -> str:
        return "one of " + ", ".join(map(str, self.values))

    def bad_values(self) -> list:
        return ["no-such-value", 3]


FLAG = Choice((True, False))


@dataclass(frozen=True)
class Text:
    """A string; `empty` says whether '' is allowed."""
    empty: bool = False

    def problem(self, value) -> str | None:
        return None if isinstance(value, str) and (self.empty or value) else self.allowed()

    def allowed(self) -> str:
        return "a string" if self.empty else "a non-empty string"

    def bad_values(self) -> list:
        return [3] if self.empty else ["", 3]


@dataclass(frozen=True)
class Relation:
    """`holds(config)` must be true; otherwise `field` is named with `message`, formatted with the
    config as `c` (e.g. 'must be <= train.steps = {c.train.steps}'), or `message(config)`."""
    field: str
    holds: object
    message: object


def leaves(config, prefix: str = "") -> dict:
    """{'a.b': value} for every field of a ConfigDict."""
    fields = {}
    for name, value in config.items():
        if hasattr(value, "items"):
            fields.update(leaves(value, f"{prefix}{name}."))
        else:
            fields[f"{prefix}{name}"] = value
    return fields


def check(config, rules: dict, relations: tuple) -> None:
    """Raises UserError for the first field that breaks its rule, then for the first broken relation."""
    for field, value in leaves(config).items():
        rule = rules.get(field)
        if rule is None:
            raise UserError(f"{field}: no validation rule for this field; add one to mhc_jax/config_rules.py's FIELD_RULES")
        problem = rule.problem(value)
        if problem:
            raise UserError(f"{field}: got {value!r}; must be {problem}")
    for relation in relations:
        if not relation.holds(config):
            value = leaves(config)[relation.field]
            message = relation.message(config) if callable(relation.message) else relation.message.format(c=config)
            raise UserError(f"{relation.field}: got {value!r}; {message}")
