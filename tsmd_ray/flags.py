"""Command-line flags for every ``Config`` field (``--inner-steps``), and ``--config FILE.yaml``.

Explicit flags win over the file, the file wins over the defaults. Booleans take both forms:
``--mlflow`` / ``--no-mlflow`` and ``--mlflow false``.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from .config import Config, load_yaml


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class BoolFlag(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag`` as users type them, and ``--flag false`` as YAML-minded users do."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.nargs = "?"
        self.metavar = "BOOL"

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        negated = option_string.startswith("--no-")
        if negated and values is not None:
            parser.error(f"{option_string} takes no value")
        try:
            value = True if values is None else _parse_bool(values)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {option_string}: {exc}")
        setattr(namespace, self.dest, value != negated)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _field_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
    if "list[int]" in kind:
        kwargs.update(type=int, nargs="+")
    elif kind.startswith("bool"):
        kwargs["action"] = BoolFlag
    elif kind.startswith("int"):
        kwargs["type"] = int
    elif kind.startswith("float"):
        kwargs["type"] = float
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per Config field to ``parser``."""
    parser.add_argument("--config", help="YAML file with Config keys (flags override it)")
    group = parser.add_argument_group("configuration")
    for f in fields(Config):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_field_kwargs(f))


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config`` file, then explicit flags."""
    data: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in fields(Config)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return Config.from_dict(data)

