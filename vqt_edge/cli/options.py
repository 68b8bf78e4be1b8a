"""What several commands share: options generated from the config dataclasses, the list parser,
and the start of every device command (one definition each, so their help and behaviour stay the same)."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints, overload

import click

from vqt_edge.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

ARCH_SIZES = (
    ("--depth", "number of layers"),
    ("--dim", "embedding dimension"),
    ("--heads", "attention heads"),
    ("--mlp-dim", "MLP hidden size"),
    ("--patch", "patch size"),
    ("--image-size", "input resolution"),
)


def arch_size_options(command: F) -> F:
    """--depth --dim --heads --mlp-dim --patch --image-size: override a preset, or define a model."""
    for flag, what in reversed(ARCH_SIZES):
        command = click.option(flag, type=int, help=f"Override/define: {what}.")(command)
    return command


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _click_type(annotation: Any) -> Any:
    """int | None -> int: the option's value type (None is the option's absence)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def config_options(config: type, names: list[str], **overrides: dict[str, Any]) -> Callable[[F], F]:
    """Click options for these fields of a config dataclass: flag, type, default, choices and help come
    from the field (vqt_edge/config.py); `overrides[name]` replaces any of them for one command.
    A field whose default is "auto" shows as an option without a default (absent = auto)."""
    by_name = {f.name: f for f in dataclasses.fields(config)}
    hints = get_type_hints(config)

    def decorate(command: F) -> F:
        for name in reversed(names):
            f = by_name[name]
            spec: dict[str, Any] = {"help": f.metadata.get("help"), "default": f.default, "show_default": True}
            if "choices" in f.metadata:
                spec["type"] = click.Choice([c for c in f.metadata["choices"]])
            elif name.endswith("_mb"):
                spec["type"] = str  # a size with its unit, parsed by parse_size_mb
            elif hints[name] is bool:
                spec.update(is_flag=True, show_default=False)
            else:
                spec["type"] = _click_type(hints[name])
            if "metavar" in f.metadata:
                spec["metavar"] = f.metadata["metavar"]
            spec.update(overrides.get(name, {}))
            if "[default:" in (spec["help"] or ""):  # the help says it in words
                spec["show_default"] = False
            if (
                spec["default"] is None
                or spec["default"] == "auto"
                and "auto" not in getattr(spec["type"], "choices", ())
            ):
                spec["default"], spec["show_default"] = None, False
            command = click.option(_flag(f), name, **spec)(command)
        return command

    return decorate


def build_config(config: type, values: dict[str, Any]) -> Any:
    """The config dataclass from a command's option values (fields absent from `values` keep their
    defaults; an absent "auto" option stays "auto"; sizes are parsed)."""
    from vqt_edge.memory import parse_size_mb

    kw: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name not in values:
            continue
        value = values[f.name]
        if value is None and f.default == "auto":
            value = "auto"
        elif value is not None and f.name.endswith("_mb"):
            value = parse_size_mb(value)
        kw[f.name] = value
    return config(**kw)


@overload
def parse_list(text: str, kind: Callable[[str], T], flag: str, n: int | None = None) -> list[T]: ...
@overload
def parse_list(text: None, kind: Callable[[str], T], flag: str, n: int | None = None) -> None: ...
def parse_list(text: str | None, kind: Callable[[str], T], flag: str, n: int | None = None) -> list[T] | None:
    """'a,b,c' -> [kind(a), kind(b), kind(c)]; with `n`, one value is repeated n times and any other
    count but n is an error. None stays None; an empty list is an error."""
    if text is None:
        return None
    try:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma-separated list, got {text!r}") from None
    if n is not None and len(values) == 1:
        values *= n
    if not values or (n is not None and len(values) != n):
        raise UserError(f"{flag}: expected {n or 'some'} comma-separated values, got {text!r}")
    return values


def device_command(command: F) -> F:
    """The start of every command that runs on the device, before it imports anything heavy: torch
    made unimportable (the device side runs as it would without it, and skips its 230 MB import,
    docs/design.md section 7) and lean malloc (freed batches go back to the OS; the memory model
    assumes it: vqt_edge/memory)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from device_runner import ort
        from vqt_edge.memory import lean_malloc

        ort.block_torch()
        lean_malloc()
        return command(*args, **kwargs)

    return run  # type: ignore[return-value]


PATH = click.Path(path_type=Path)
