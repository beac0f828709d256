"""What a sweep searches: config values over a preset (`SweepSpace`), checked whole before any trial starts.

    {"preset": "demo", "trials": 8, "sampler": "tpe", "max_concurrent": 2,
     "dimensions": [{"key": "optim.max_lr", "low": 1e-3, "high": 3e-2, "log": true},
                    {"key": "optim.optimizer", "choices": ["adamw", "muon"]}]}

A dimension is a range (floats, or integers with `integer`; `log` for a log-uniform one) or a list of choices;
its key is any `--set` key of the run config (dotted, or a unique bare name). Values that only make sense
together (a model shape: n_layer, n_head and n_embd) are one dimension of named `sets`, each a group of keys and
values; its key names the dimension, and a trial's value is the name of its set:

     {"key": "shape", "sets": {"d2": {"n_layer": 2, "n_head": 2, "n_embd": 64},
                               "d4": {"n_layer": 4, "n_head": 4, "n_embd": 128}}}

`check()` refuses, in one line each: an unknown key (with the keys it resembles), a range, choice or set the
config itself rejects (both ends of every range, every choice and every set are tried), a key that two
dimensions sweep, a grid over a continuous range, a budget past what a grid holds, and a grid trial whose values,
each accepted alone, clash (n_head and n_embd). A random or TPE sampler's trials are drawn later: one whose
values clash fails as a trial, with the config's reason, and the sweep goes on.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import BadInput
from training.config import ConfigError, load_config, resolve_key

Value = str | int | float | bool


class SweepError(BadInput, ValueError):
    """A sweep that cannot run as given; the message names the dimension."""


def _one_line(err: Exception) -> str:
    """The config's message (a line per problem) as one line."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


class Dimension(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    key: str = Field(
        min_length=1,
        max_length=100,
        description="a run config key, as --set takes it; with sets, the dimension's name",
    )
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="draw log-uniformly between low and high")
    integer: bool = Field(False, description="the range holds integers")
    choices: list[Value] | None = Field(None, min_length=1)
    sets: dict[str, dict[str, Value]] | None = Field(
        None,
        min_length=1,
        description="named choices, each a group of config keys and values set together (a model shape)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        ranged = self.low is not None or self.high is not None
        if ranged + (self.choices is not None) + (self.sets is not None) != 1:
            raise ValueError(f"{self.key}: give one of low and high, choices, or sets")
        # a sets dimension's name and its sets' names are shown in tables, tags and params: plain names only
        if self.sets is not None and not _PLAIN_NAME.fullmatch(self.key):
            raise ValueError(
                f"{self.key!r}: a dimension of sets is named in letters, digits, '.', '_', '-'"
            )
        for name, values in (self.sets or {}).items():
            if not _PLAIN_NAME.fullmatch(name):
                raise ValueError(
                    f"{self.key}: set {name!r}: a set is named in 1 to 100 letters, digits, '.', '_', '-'"
                )
            if not values:
                raise ValueError(f"{self.key}: set {name!r} sets nothing")
        if ranged:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{self.key}: a range needs low < high")
            if self.log and self.low <= 0:
                raise ValueError(f"{self.key}: a log range needs low > 0")
            if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError(f"{self.key}: an integer range needs integer ends")
        return self

    def ends(self) -> list[Value]:
        """The values the config must accept for the dimension to be valid: both ends, every choice, or every
        set's name."""
        if self.sets is not None:
            return list(self.sets)
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.integer:
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def config_keys(self) -> list[str]:  # not keys(): Prefect would take the model for a mapping
        """The config keys the dimension sets."""
        return (
            [self.key]
            if self.sets is None
            else list(dict.fromkeys(k for v in self.sets.values() for k in v))
        )

    def overrides(self, value: Value) -> list[str]:
        """The `--set` items of one of its values (a set's name: every key of that set)."""
        if self.sets is None:
            return [override(self.key, value)]
        if not isinstance(value, str) or value not in self.sets:
            raise SweepError(
                f"dimension {self.key!r} has no set {value!r}: its sets are {list(self.sets)}"
            )
        return [override(k, v) for k, v in self.sets[value].items()]

    def grid(self) -> list[Value]:
        if self.sets is not None:
            return list(self.sets)
        if self.choices is not None:
            return list(self.choices)
        if not self.integer:
            raise SweepError(
                f"{self.key}: a grid needs choices or an integer range, not a continuous range "
                "(use sampler random or tpe, or list the values as choices)"
            )
        assert self.low is not None and self.high is not None
        return list(range(int(self.low), int(self.high) + 1))


def override(key: str, value: Value) -> str:
    """The `--set` item of a value: booleans as the config spells them."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}"


class SweepSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("demo", description="the run config every trial starts from")
    overrides: list[str] = Field(default_factory=list, description="fixed for every trial")
    dimensions: list[Dimension] = Field(min_length=1)
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    trials: int = Field(gt=0, description="how many trials at most")
    max_concurrent: int = Field(1, gt=0, description="trials running at once, at most")
    seed: int = 0

    @model_validator(mode="after")
    def _distinct(self) -> SweepSpace:
        keys = [d.key for d in self.dimensions]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"a key is swept twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}"
            )
        return self

    def check(self) -> None:
        """Everything that can be known wrong before a trial runs (module docstring)."""
        try:
            load_config(self.preset, self.overrides)
        except ConfigError as err:
            raise SweepError(f"the sweep's base config: {_one_line(err)}") from None
        swept: dict[str, str] = {}  # config key -> the dimension that sweeps it
        for dim in self.dimensions:
            for key in dim.config_keys():
                try:
                    full = resolve_key(key)
                except ConfigError as err:
                    raise SweepError(f"dimension {dim.key!r}: {_one_line(err)}") from None
                if swept.setdefault(full, dim.key) != dim.key:
                    raise SweepError(
                        f"{full} is swept by two dimensions, {swept[full]!r} and {dim.key!r}"
                    )
            for value in dim.ends():
                what = f"set {value!r}" if dim.sets is not None else repr(value)
                try:
                    load_config(self.preset, [*self.overrides, *dim.overrides(value)])
                except ConfigError as err:
                    raise SweepError(
                        f"dimension {dim.key!r}: the run config refuses {what}: {_one_line(err)}"
                    ) from None
        if self.sampler == "grid":
            size = math.prod(len(d.grid()) for d in self.dimensions)
            if self.trials > size:
                raise SweepError(
                    f"the grid holds {size} trials and the budget is {self.trials}: lower trials to {size}"
                )
            # a grid's trials are known now: each is tried whole (values the config takes alone can clash)
            for point in self.grid_points()[: self.trials]:
                try:
                    load_config(self.preset, self.trial_overrides(point))
                except ConfigError as err:
                    raise SweepError(
                        f"the grid's trial {point}: the run config refuses it: {_one_line(err)}"
                    ) from None

    def grid_points(self) -> list[dict[str, Value]]:
        """Every point of a grid sweep, in a fixed order."""
        keys = [d.key for d in self.dimensions]
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(d.grid() for d in self.dimensions))
        ]

    def trial_overrides(self, point: dict[str, Any]) -> list[str]:
        """A trial's config overrides: the fixed ones, then each dimension's value (a set: all its keys)."""
        return [*self.overrides, *(o for d in self.dimensions for o in d.overrides(point[d.key]))]
