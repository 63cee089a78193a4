"""Dataclass configs: YAML files in configs/ map 1:1 onto fields, CLI flags override keys.

Each field's `metadata["help"]` becomes its `--help` line, so the dataclass is the single
place an option is declared."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .atomic import atomic_write_text
from .errors import UserError
from .paths import read_user_text

T = TypeVar("T")


def field(default: Any, help: str, aliases: tuple[str, ...] = (), **kw: Any) -> Any:
    """A dataclass field with its help text and any extra flag spellings (lists/dicts get a default_factory)."""
    meta = {"help": help, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) for an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple, Sequence):
        return typing.get_args(tp)[0], True
    return tp, False


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with --config plus one flag per dataclass field."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file whose keys are the options below; flags given here override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        conv = _bool if tp is bool else tp
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # plain prose
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if is_list:
            kw.update(nargs="*", type=conv)
        elif tp is bool:
            kw.update(nargs="?", const=True, type=_bool, metavar="true|false")
        else:
            kw.update(type=conv)
        parser.add_argument(flag, *f.metadata.get("aliases", ()), **kw)
    return parser


def _coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """A YAML value converted as the matching flag would be, or a UserError naming the key: a YAML
    `steps: ten` must fail here, not as a TypeError deep inside the run."""
    scalar, is_list = _base_type(tp)
    if value is None:
        return None
    if is_list:
        return [_coerce(v, scalar, name, source) for v in (value if isinstance(value, (list, tuple)) else [value])]
    try:
        return _convert(value, scalar)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserError(f"{source}: key {name!r} expects {getattr(scalar, '__name__', scalar)}, got {value!r} "
                        f"— fix that value") from None


def _convert(value: Any, scalar: Any) -> Any:
    if scalar not in (bool, int, float, str, Path):
        return value
    if scalar is bool:
        if isinstance(value, (bool, int, str)):
            return value if isinstance(value, bool) else _bool(str(value))
        raise TypeError(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    if scalar is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return scalar(value)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a mapping, naming any unknown key or mistyped value and the source it came from."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)} — valid keys: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], k, source) for k, v in data.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config, with a one-line error naming the file for anything else."""
    path = Path(path)
    text = read_user_text(path, "--config")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise UserError(f"--config {path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc}) "
                        f"— fix that line") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value at the top level")
    return data


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str) -> T:
    """Defaults <- YAML (--config) <- CLI flags, returned as a `cls` instance."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    data = load_yaml(config_path) if config_path else {}
    data.update(args)
    return from_dict(cls, data, source=str(config_path or "command line"))


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run can be reproduced."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
