"""The secured variant commented out at the end of docker-compose.yml, uncommented and checked as an override.

It cannot run here (no Docker, no managed Kafka); these checks catch what would break it silently: a
misspelt setting, settings that fail their own validation, a secret file named in a setting but not
mounted, a Redis URL on another port than the TLS port.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml

from stream_sentiment.config import ENV_PREFIX, Settings
from tests.deploy.compose_files import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    environment_of,
    interpolate_tree,
    raw_compose,
    read_env_file,
)
from tests.deploy.test_compose import FILLED_SECRET, unknown_settings_variables

SECRET_PATH = re.compile(r"/run/secrets/([A-Za-z0-9_.-]+)")


class _OverrideLoader(yaml.SafeLoader):
    """Compose's merge tags: ``!reset`` empties a value, ``!override`` replaces it instead of merging."""


_OverrideLoader.add_constructor("!reset", lambda loader, node: None)
_OverrideLoader.add_constructor(
    "!override", lambda loader, node: loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node, deep=True))


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    found = re.search(r"^# secured-example:begin\n(.*?)^# secured-example:end$", text, flags=re.S | re.M)
    assert found, "docker-compose.yml lost its secured-example markers"
    lines = found.group(1).splitlines()
    assert all(line == "#" or line.startswith("# ") for line in lines), "every example line is commented out"
    document = yaml.load("\n".join(line[2:] for line in lines), Loader=_OverrideLoader)
    env = {key: value or FILLED_SECRET for key, value in read_env_file(ENV_EXAMPLE).items()}
    return interpolate_tree(document, env)


def _merged_environment(name: str, override: dict[str, Any]) -> dict[str, str]:
    env = {key: value or FILLED_SECRET for key, value in read_env_file(ENV_EXAMPLE).items()}
    base = interpolate_tree(raw_compose(), env)["services"][name]
    return {**environment_of(base), **environment_of(override["services"][name])}


@pytest.mark.parametrize("name", ["kafka-init", "worker", "producer"])
def test_secured_environment_loads_as_settings(override: dict[str, Any], name: str, monkeypatch) -> None:
    environment = _merged_environment(name, override) if name != "kafka-init" else \
        environment_of(override["services"][name])
    assert not unknown_settings_variables(environment)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    settings = Settings.load()  # the validators: SASL complete, TLS files only with TLS, rediss:// for Redis TLS
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.sasl_password is None
    assert settings.kafka.sasl_password_file is not None
    if name == "worker":
        assert settings.redis_url.startswith("rediss://") and settings.redis.password_file is not None
        command = override["services"]["redis"]["command"]
        port = command[command.index("--tls-port") + 1]
        assert settings.redis_url == f"rediss://redis:{port}/0"


def test_every_secret_a_service_names_is_mounted_and_declared(override: dict[str, Any]) -> None:
    declared = set(override["secrets"])
    for name, service in override["services"].items():
        named = set(SECRET_PATH.findall(yaml.safe_dump(service)))
        assert named <= set(service.get("secrets", [])), f"{name} names secrets it does not mount"
        assert set(service.get("secrets", [])) <= declared, f"{name} mounts undeclared secrets"
    assert all(not str(value).startswith("/") for value in override["secrets"].values())  # files beside the project


def test_no_secret_value_is_written_in_the_example(override: dict[str, Any]) -> None:
    for service in override["services"].values():
        for key in environment_of(service):
            assert not key.endswith(("PASSWORD", "TOKEN")), f"{key}: a secret belongs in a file"
