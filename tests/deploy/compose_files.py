"""Reading the deployment files as Docker Compose and Docker would, without Docker.

Compose substitutes ``${VARIABLE}`` references (from the shell and ``.env``) before it validates
or uses the file, so the checks run on the file interpolated with ``.env.example``'s values, the
way ``cp .env.example .env`` leaves it. ``.dockerignore`` matching follows Docker's rules: a
pattern excludes a path when it matches the path or one of its parent folders, and the last
matching pattern wins (``!`` re-includes).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"

# $$ (a literal $), ${NAME...} or $NAME, as the Compose Specification's interpolation defines them.
_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>.*))?", re.S)


class InterpolationError(ValueError):
    """A ``${NAME:?message}`` variable is missing, or a reference is malformed."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every variable reference substituted, like ``docker compose config``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        braced = _BRACED.fullmatch(match.group("braced"))
        if braced is None:
            raise InterpolationError(f"invalid reference {match.group()!r}")
        name, operator, argument = braced.group("name", "operator", "argument")
        value = env.get(name)
        # With a colon, an empty value counts as unset.
        unset = value is None or (operator is not None and operator.startswith(":") and value == "")
        if operator is None:
            return value or ""
        if operator.endswith("-"):
            return interpolate(argument, env) if unset else str(value)
        if operator.endswith("?"):
            if unset:
                raise InterpolationError(f"required variable {name} is missing a value: {argument}")
            return str(value)
        return "" if unset else interpolate(argument, env)  # ":+" / "+": the argument when set

    return _REFERENCE.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value (not keys) of a parsed YAML document."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def referenced_variables(node: Any) -> dict[str, str | None]:
    """Variables referenced anywhere in a parsed document: name to its ``:?``/``?`` operator, or None."""
    found: dict[str, str | None] = {}
    if isinstance(node, str):
        for match in _REFERENCE.finditer(node):
            if match.group("named"):
                found.setdefault(match.group("named"), None)
            elif match.group("braced") is not None:
                braced = _BRACED.fullmatch(match.group("braced"))
                if braced is not None:
                    operator = braced.group("operator")
                    required = operator if operator in (":?", "?") else None
                    found[braced.group("name")] = found.get(braced.group("name")) or required
    elif isinstance(node, list):
        for item in node:
            for name, required in referenced_variables(item).items():
                found[name] = found.get(name) or required
    elif isinstance(node, dict):
        for value in node.values():
            for name, required in referenced_variables(value).items():
                found[name] = found.get(name) or required
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (comments and blank lines skipped, quotes removed)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, separator, value = stripped.partition("=")
        if not separator or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path.name}:{number}: not KEY=VALUE: {line!r}")
        values[key] = value.strip().strip("'\"")
    return values


def raw_compose() -> dict[str, Any]:
    """The compose file as written (YAML anchors and merge keys resolved, variables not)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (list or mapping form) as the strings the container sees."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    values: dict[str, str] = {}
    for key, value in environment.items():
        if value is None:
            continue
        # Compose writes YAML booleans as true/false; Python's str() would say True/False.
        values[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return values


# -- Dockerfiles and .dockerignore ---------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_base_images(path: Path) -> list[str]:
    """The image of every FROM, with ``${ARG}`` defaults substituted; build stages are skipped."""
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    images: list[str] = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            defaults[name.strip()] = default.strip()
        elif keyword == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--")]
            image = interpolate(words[0], defaults)
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image not in stages:
                images.append(image)
    return images


def dockerfile_copy_sources(path: Path) -> list[str]:
    """Sources of every COPY/ADD from the build context (not ``--from`` another stage)."""
    sources: list[str] = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(arguments)
        if any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources += paths[:-1]
    return sources


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, str]]:
    """(is_exception, cleaned pattern) for each line, as Docker reads them."""
    patterns: list[tuple[bool, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        exception = stripped.startswith("!")
        pattern = stripped[1:].strip() if exception else stripped
        patterns.append((exception, pattern.strip("/")))
    return patterns


def in_build_context(relative_path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether Docker sends ``relative_path`` (from the context root) to the builder."""
    components = relative_path.strip("/").split("/")
    excluded = False
    for exception, pattern in patterns:
        regex = _pattern_regex(pattern)
        # A matched folder takes everything below it along.
        if any(regex.fullmatch("/".join(components[:depth])) for depth in range(1, len(components) + 1)):
            excluded = not exception
    return not excluded
