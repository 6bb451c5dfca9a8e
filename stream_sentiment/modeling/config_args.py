"""Training configurations as command-line options: one option per field of a config dataclass.

``train``, ``train_v2`` and ``train_e5`` each keep their hyperparameters in a frozen dataclass (defaults,
recorded whole in ``training.json``); this turns its fields into ``--kebab-case`` options and back, so a
field added to a config is an option at once, with the same parsing everywhere. Torch-free on purpose:
the parsing is tested without the training stack.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from typing import Any, TypeVar

Config = TypeVar("Config")


def parse_bool(text: str) -> bool:
    """``--flag true|false`` (and 1/yes): a boolean field keeps an explicit value, so sweeps can set it either way."""
    return text.lower() in ("1", "true", "yes")


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One ``--field-name`` option per field of the dataclass instance ``defaults``, typed by its default."""
    for name, value in asdict(defaults).items():
        kind = parse_bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)


def config_from_arguments(cls: type[Config], args: argparse.Namespace) -> Config:
    """The config of class ``cls`` that the options added by :func:`add_config_arguments` describe."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})  # type: ignore[arg-type]
