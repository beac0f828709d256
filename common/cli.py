"""What every `python -m ...` command of the project shares.

- `entry_point`: a project error (common/errors.py) becomes one line on stderr and its class's exit code;
  anything else is a bug and keeps its traceback.
- `add_model_flags` / `model_from_flags`: a command whose input is a typed model (JobSpec, PretrainParams)
  derives its flags from the model's fields, so a field added to the model is a flag at once, with the
  model's own validation and description.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from common import exit_codes
from common.errors import BadInput, ReproError


class Main(Protocol):
    """A command's `main`: its arguments (sys.argv[1:] when None), its exit code."""

    def __call__(self, argv: list[str] | None = None) -> int: ...


def entry_point(main: Callable[[list[str] | None], int | None]) -> Main:
    """Wrap a CLI's `main(argv)`: project errors are one line on stderr and exit with their code."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
        except ReproError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return err.exit_code
        except Exception as err:
            unanswered = unanswered_call(err)
            if unanswered is None:
                raise  # a bug: its traceback says where
            print(f"error: {unanswered}", file=sys.stderr, flush=True)
            return exit_codes.FAILED
        return exit_codes.OK if code is None else code

    return run


# the errors of a call whose deadline passed, by class name (botocore, aiohttp, requests, the standard library)
_UNANSWERED = {
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "EndpointConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "ServerTimeoutError",
    "TimeoutError",
    "StoreUnreachable",
}


def unanswered_call(err: BaseException) -> str | None:
    """One line for an error that says something did not answer in time (a store, a server), else None."""
    seen: BaseException | None = err
    while seen is not None:
        if _UNANSWERED & {c.__name__ for c in type(seen).__mro__}:
            detail = str(seen) or type(seen).__name__
            return f"{detail} (no answer in time; nothing was lost: run the command again)"
        seen = seen.__cause__ or seen.__context__
    return None


def _number(kind: type, minimum: float | None, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if (
            value != value
            or value in (float("inf"), float("-inf"))
            or (minimum is not None and value < minimum)
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value

    parse.__name__ = name  # argparse names the type in its message
    return parse


# argparse types: a value out of range is a usage error (exit 2, one line), never a silent clamp
positive_int = _number(int, 1, "a positive integer")
non_negative_int = _number(int, 0, "an integer >= 0")
non_negative_float = _number(float, 0, "a finite number >= 0")


def validation_message(err: ValidationError, what: str, known: Iterable[str] = ()) -> str:
    """A pydantic error as lines a person reads: `field: problem (got value)`; an unknown field is matched
    against the `known` field paths for a suggestion."""
    known = list(known)
    lines = [f"invalid {what}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, known, n=1)
            lines.append(
                f"  {loc}: unknown field" + (f"; did you mean {close[0]}?" if close else "")
            )
            continue
        got = e.get("input")
        lines.append(
            f"  {loc}: {e['msg']}"
            + ("" if isinstance(got, dict) or "input" not in e else f" (got {got!r})")
        )
    return "\n".join(lines)


def _unwrap_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    skip: Iterable[str] = (),
    aliases: dict[str, list[str]] | None = None,
    comma_lists: Iterable[str] = (),
    flat: dict[str, tuple[str, str]] | None = None,
) -> None:
    """One `--field-name` flag per scalar or list field of `model` (nested models come through a JSON file or
    object instead). Flags left out stay out of the namespace, so `model_from_flags` sees only what was given.
    `aliases` adds other spellings; a field in `comma_lists` takes one comma-separated value (empty = [])
    instead of one value per repeated flag. `flat` names fields of nested sections that get a flag too, under
    a flat name the model accepts for them (`hang_floor_s` for `hang.floor_s`)."""
    aliases, comma_lists, skip = aliases or {}, set(comma_lists), set(skip)
    group = parser.add_argument_group(f"{model.__name__} fields")
    fields = [(name, field) for name, field in model.model_fields.items() if name not in skip]
    for name, (section, sub) in (flat or {}).items():
        section_model = _unwrap_optional(model.model_fields[section].annotation)
        fields.append((name, section_model.model_fields[sub]))
    for name, field in fields:
        ann = _unwrap_optional(field.annotation)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            continue
        flag = _flag(name, field, ann, name in comma_lists)
        group.add_argument(f"--{name.replace('_', '-')}", *aliases.get(name, []), **flag)


def _flag(name: str, field: FieldInfo, ann: Any, comma_list: bool) -> dict[str, Any]:
    """argparse's keywords for the flag of one field."""
    default = field.get_default(call_default_factory=True)
    help_text = (field.description or "") + (
        f" (default: {default})" if default not in (None, [], "") else ""
    )
    kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text.strip() or None)
    origin = typing.get_origin(ann)
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is list:
        if comma_list:
            kw.update(type=_comma_list, metavar="A,B,...")
        else:
            kw.update(action="append", metavar="VALUE")
    elif origin is Literal:
        kw["choices"] = [str(c) for c in typing.get_args(ann)]
    else:
        kw["metavar"] = getattr(ann, "__name__", "VALUE").upper()
    return kw


def read_json_object(path_or_text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from a file path or inline text (`--spec`, `--params`); bad JSON is a BadInput."""
    if not path_or_text:
        return {}
    text = path_or_text
    if not path_or_text.lstrip().startswith("{"):
        try:
            text = Path(path_or_text).read_text()
        except OSError as err:
            raise BadInput(f"cannot read {what} {path_or_text!r}: {err.strerror}") from None
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise BadInput(f"{what} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{what} must be a JSON object")
    return obj


def model_from_flags(
    model: type[BaseModel],
    args: argparse.Namespace,
    base: dict[str, Any] | None = None,
    flat: Iterable[str] = (),
):
    """`model` from `base` (e.g. a --spec file) with the flags given on top; invalid values are a BadInput.
    `flat`: the flat names `add_model_flags` made flags for (the model nests them itself)."""
    names = set(model.model_fields) | set(flat)
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        return model.model_validate({**(base or {}), **given})
    except ValidationError as err:
        raise BadInput(validation_message(err, model.__name__)) from None
