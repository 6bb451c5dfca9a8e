"""Training configs as command-line options (``modeling/config_args``), without the training stack."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from stream_sentiment.modeling.config_args import add_config_arguments, config_from_arguments


@dataclass(frozen=True)
class _Config:
    learning_rate: float = 5e-5
    epochs: int = 2
    class_balance: bool = True
    normalization: str = "twitter-v1"


def _parse(argv: list[str]) -> _Config:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    add_config_arguments(parser, _Config())
    return config_from_arguments(_Config, parser.parse_args(argv))


def test_defaults_round_trip_and_each_field_is_an_option_of_its_type() -> None:
    assert _parse([]) == _Config()
    assert _parse(["--learning-rate", "3e-5", "--epochs", "4", "--class-balance", "false",
                   "--normalization", "none", "--output", "x"]) == _Config(3e-5, 4, False, "none")
    assert _parse(["--class-balance", "yes"]).class_balance is True
