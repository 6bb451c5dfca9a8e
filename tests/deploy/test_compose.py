"""docker-compose.yml, the Dockerfiles and Prometheus' config, checked without Docker.

The schema is the official Compose Specification JSON schema as check-jsonschema vendors it
(a dev dependency, with the schema's Apache-2.0 licence beside it), so no test downloads anything.
The other checks are the cross-file facts the schema cannot know: settings variables, topics,
ports, mounted files, the GPU profile.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.validators import validator_for
from pydantic import BaseModel

from stream_sentiment.admin.server import OPEN_PATHS
from stream_sentiment.config import ADMIN_TOKEN_ALIAS, ENV_NESTED_DELIMITER, ENV_PREFIX, Settings
from tests.deploy.compose_files import (
    ENV_EXAMPLE,
    REPO,
    InterpolationError,
    dockerfile_base_images,
    dockerfile_copy_sources,
    dockerfile_instructions,
    dockerignore_patterns,
    environment_of,
    in_build_context,
    interpolate,
    interpolate_tree,
    raw_compose,
    read_env_file,
    referenced_variables,
)

WORKERS = ("worker", "worker-gpu", "worker-shared-gpu")
ONE_SHOTS = ("kafka-init", "producer")  # restart only after a failure: a finished run stays finished
HEALTHCHECKED = ("kafka", "redis", *WORKERS, "engine-server", "prometheus", "grafana")
# Services built from the TensorRT image; the others that build use the CPU one.
GPU_IMAGE_SERVICES = ("worker-gpu", "engine-server")
CPU_DOCKERFILE = "docker/worker-cpu.Dockerfile"
GPU_DOCKERFILE = "docker/worker-gpu.Dockerfile"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
WORKER_JOB = "stream-sentiment"
# Secrets .env.example leaves empty on purpose, filled here the way a user fills them.
FILLED_SECRET = "test-secret-value"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return {key: value or FILLED_SECRET for key, value in read_env_file(ENV_EXAMPLE).items()}


@pytest.fixture(scope="module")
def compose(example_env: dict[str, str]) -> dict[str, Any]:
    return interpolate_tree(raw_compose(), example_env)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema (the Compose schema's source) is missing: pip install -e '.[dev]'")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))


def settings_variables() -> set[str]:
    """Every environment variable Settings reads, groups included (as docs/settings.md lists them)."""

    def walk(model: BaseModel, prefix: str) -> Iterator[str]:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                yield from walk(value, f"{prefix}{name.upper()}{ENV_NESTED_DELIMITER}")
            else:
                yield f"{prefix}{name.upper()}"

    # model_construct: the defaults, whatever this process' environment says.
    return set(walk(Settings.model_construct(), ENV_PREFIX)) | {ADMIN_TOKEN_ALIAS}


def unknown_settings_variables(environment: Mapping[str, str]) -> list[str]:
    known = settings_variables()
    return sorted(key for key in environment if key.startswith(ENV_PREFIX) and key not in known)


def dockerfile_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ENV":
            for word in shlex.split(arguments):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def admin_port(service: Mapping[str, Any]) -> int:
    return int(environment_of(service)[f"{ENV_PREFIX}ADMIN{ENV_NESTED_DELIMITER}PORT"])


# -- the interpolation the other checks rely on ----------------------------------------------------


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("${A}", {"A": "x"}, "x"),
    ("${A:-d}", {"A": ""}, "d"),
    ("${A-d}", {"A": ""}, ""),
    ("${A:-d}", {}, "d"),
    ("${A:-d}.dlq", {"A": "posts"}, "posts.dlq"),
    ("$$A $A", {"A": "x"}, "$A x"),
    ("${A:+set}", {"A": "1"}, "set"),
    ("${A:?needed}", {"A": "v"}, "v"),
])
def test_interpolation_follows_the_compose_rules(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_compose_refuses_to_start_without_the_admin_token() -> None:
    as_shipped = read_env_file(ENV_EXAMPLE)  # the secrets are empty until the user sets them
    with pytest.raises(InterpolationError, match=r"STREAM_SENTIMENT_ADMIN_TOKEN.*\.env\.example"):
        interpolate_tree(raw_compose(), as_shipped)


def test_env_example_documents_exactly_the_variables_compose_uses() -> None:
    referenced = referenced_variables(raw_compose())
    documented = read_env_file(ENV_EXAMPLE)
    assert set(referenced) == set(documented), "compose and .env.example disagree on the variables"
    required = {name for name, operator in referenced.items() if operator}
    assert required == {name for name, value in documented.items() if not value}, \
        "exactly the required (${VAR:?...}) variables are the ones .env.example leaves for the user to fill"
    assert "STREAM_SENTIMENT_ADMIN_TOKEN" in required


# -- the schema ------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any], compose_schema: dict) -> None:
    validator_class = validator_for(compose_schema)
    validator_class.check_schema(compose_schema)
    errors = sorted(validator_class(compose_schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_check_catches_a_misspelt_key(compose: dict[str, Any], compose_schema: dict) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["helthcheck"] = broken["services"]["worker"].pop("healthcheck")
    validator = validator_for(compose_schema)(compose_schema)
    assert any("helthcheck" in error.message for error in validator.iter_errors(broken))


# -- services and their wiring ---------------------------------------------------------------------


def test_depends_on_targets_exist_and_their_conditions_can_be_met(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no healthcheck"
            if condition == "service_completed_successfully":
                assert target in ONE_SHOTS, f"{name} waits for {target} to finish, but it runs forever"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_wait_for_their_topics_and_redis(services: dict[str, Any], name: str) -> None:
    depends = services[name]["depends_on"]
    assert depends["kafka-init"]["condition"] == "service_completed_successfully"
    assert depends["redis"]["condition"] == "service_healthy"


def test_every_settings_variable_is_a_real_setting(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert not unknown_settings_variables(environment_of(service)), f"{name} sets unknown settings"
    for dockerfile in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        assert not unknown_settings_variables(dockerfile_env(REPO / dockerfile)), f"{dockerfile} sets unknown settings"


def test_a_misspelt_setting_is_caught() -> None:
    assert unknown_settings_variables({"STREAM_SENTIMENT_BATCHING__WINDOWMS": "10", "PATH": "/bin"}) == [
        "STREAM_SENTIMENT_BATCHING__WINDOWMS"]


def service_settings(services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the service's container starts with: its image's ENV, then its compose environment."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    image_env = dockerfile_env(REPO / (GPU_DOCKERFILE if name in GPU_IMAGE_SERVICES else CPU_DOCKERFILE))
    for key, value in {**image_env, **environment_of(services[name])}.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    return Settings.load()  # type checks and cross-field rules, as the container's start-up runs them


@pytest.mark.parametrize("name", [*WORKERS, "producer", "engine-server"])
def test_service_environment_loads_as_settings(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings(services, name, monkeypatch)
    if name == "engine-server":  # no Kafka or Redis: it only scores what workers send
        assert settings.engine.backend == "tensorrt" and settings.metrics_port is not None
        return
    assert settings.bootstrap_servers == "kafka:9092"
    if name in WORKERS:
        # Reachable by Prometheus, which the admin server only allows with a token.
        assert settings.admin.host == "0.0.0.0"
        assert settings.admin.read_token() == FILLED_SECRET
        assert settings.redis_url.startswith("redis://redis:")
    if name == "worker-gpu":
        assert settings.engine.backend == "tensorrt"
    if name == "worker-shared-gpu":
        assert settings.engine.backend == "engine-server"


def test_clients_address_the_services_they_depend_on(services: dict[str, Any]) -> None:
    advertised = environment_of(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",")
    for name in (*WORKERS, "producer"):
        environment = environment_of(services[name])
        bootstrap = environment[f"{ENV_PREFIX}BOOTSTRAP_SERVERS"]
        assert any(listener.endswith(f"://{bootstrap}") for listener in advertised), f"{name}: {bootstrap}"
    for name in WORKERS:
        url = environment_of(services[name])[f"{ENV_PREFIX}REDIS_URL"]
        host = re.match(r"redis://([^:/]+)", url)
        assert host is not None and host.group(1) in services


def test_kafka_init_creates_the_topics_the_workers_use(services: dict[str, Any], monkeypatch) -> None:
    init = services["kafka-init"]
    init_env = environment_of(init)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment_of(services["worker"]).items():
        monkeypatch.setenv(key, value)
    settings = Settings.load()
    assert init_env["POSTS_TOPIC"] == settings.topic
    assert init_env["DLQ_TOPIC"] == settings.dead_letter_topic
    assert environment_of(services["producer"])[f"{ENV_PREFIX}TOPIC"] == settings.topic
    # Several partitions, so replicas of a scaled worker all get work.
    assert int(init_env["POSTS_PARTITIONS"]) >= 3
    script = "\n".join(init["command"])
    for variable in ("POSTS_TOPIC", "DLQ_TOPIC"):
        # $$ in the file: the container's shell, not compose, expands it.
        assert re.search(rf'--create --if-not-exists --topic "\${variable}"', script), variable
    assert environment_of(services["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_can_be_scaled(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert "container_name" not in service, "a fixed name allows one replica only"
    assert str(admin_port(service)) in [str(port) for port in service["expose"]]
    # The alert page is published on loopback with a host port Docker picks per replica
    # (`docker compose port --index N worker 8081`): a fixed host port would allow one replica only.
    assert service["ports"] == [f"127.0.0.1::{admin_port(service)}"]


def test_long_running_services_are_restarted_and_one_shots_are_not(services: dict[str, Any]) -> None:
    for name, service in services.items():
        expected = "on-failure" if name in ONE_SHOTS else "unless-stopped"
        assert service.get("restart") == expected, name


@pytest.mark.parametrize("name", HEALTHCHECKED)
def test_services_have_healthchecks(services: dict[str, Any], name: str) -> None:
    check = services[name].get("healthcheck") or {}
    assert check.get("test") and not check.get("disable"), name
    assert check["test"][0] in ("CMD", "CMD-SHELL"), name


class _Readiness(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_worker_healthcheck_command_reports_readiness(services: dict[str, Any], status: int, healthy: bool) -> None:
    test = services["worker"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    assert "/readyz" in OPEN_PATHS  # probed without a token
    handler = type("Handler", (_Readiness,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, f"{ENV_PREFIX}ADMIN{ENV_NESTED_DELIMITER}PORT": str(server.server_port)}
        result = subprocess.run([sys.executable, *test[2:]], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr.decode()


@pytest.mark.parametrize("listening", [True, False])
def test_engine_server_healthcheck_command_connects_to_its_socket(
    services: dict[str, Any], tmp_path: Path, listening: bool
) -> None:
    import socket

    test = services["engine-server"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    path = tmp_path / "engine.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        if listening:
            listener.bind(str(path))
            listener.listen(1)
        env = {**os.environ, f"{ENV_PREFIX}ENGINE{ENV_NESTED_DELIMITER}SERVER_SOCKET": str(path)}
        result = subprocess.run([sys.executable, *test[2:]], env=env, capture_output=True, timeout=30)
    finally:
        listener.close()
    assert (result.returncode == 0) is listening, result.stderr.decode()


def test_gpu_worker_healthcheck_allows_for_the_plan_build(services: dict[str, Any]) -> None:
    gpu, cpu = services["worker-gpu"]["healthcheck"], services["worker"]["healthcheck"]
    assert gpu["test"] == cpu["test"]
    assert gpu["start_period"].endswith("m") and int(gpu["start_period"][:-1]) >= 10


# -- images, builds and files ----------------------------------------------------------------------


def _is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" not in service:
            assert _is_pinned(service["image"]), f"{name}: {service['image']}"
    for dockerfile in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        for image in dockerfile_base_images(REPO / dockerfile):
            assert _is_pinned(image), f"{dockerfile}: {image}"


def test_builds_and_mounted_files_exist(compose: dict[str, Any], services: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"


@pytest.mark.parametrize("dockerfile", [CPU_DOCKERFILE, GPU_DOCKERFILE])
def test_dockerfiles_copy_files_that_reach_the_build_context(dockerfile: str) -> None:
    patterns = dockerignore_patterns()
    for source in dockerfile_copy_sources(REPO / dockerfile):
        path = REPO / source
        assert path.exists(), f"{dockerfile} copies missing {source}"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        sent = [f for f in files if in_build_context(f.relative_to(REPO).as_posix(), patterns)]
        assert sent, f"{dockerfile} copies {source}, which .dockerignore leaves out"
    assert any(keyword == "USER" for keyword, _ in dockerfile_instructions(REPO / dockerfile)), "runs as root"


def test_dockerignore_sends_the_package_and_engines_but_not_plans_or_secrets() -> None:
    patterns = dockerignore_patterns()
    for path in ("pyproject.toml", "README.md", "stream_sentiment/cli/__init__.py", "docker/gpu_entrypoint.py",
                 "engines/minilm-sentiment/v1/model.int8.onnx", "engines/minilm-sentiment/v1/manifest.json"):
        assert in_build_context(path, patterns), path
    for path in (".env", ".git/HEAD", "tests/conftest.py", "engines/minilm-sentiment/v1/plans/h100-sm90.plan",
                 "stream_sentiment/__pycache__/config.cpython-311.pyc", "docker-compose.yml"):
        assert not in_build_context(path, patterns), path


def test_engine_repository_in_the_images_is_where_the_engines_are_copied() -> None:
    for dockerfile in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        instructions = dockerfile_instructions(REPO / dockerfile)
        workdir = [arguments for keyword, arguments in instructions if keyword == "WORKDIR"][-1]
        engines_copy = next(a for k, a in instructions if k == "COPY" and shlex.split(a)[-2] == "engines")
        destination = Path(workdir) / shlex.split(engines_copy)[-1]
        repository = dockerfile_env(REPO / dockerfile)[f"{ENV_PREFIX}ENGINE{ENV_NESTED_DELIMITER}REPOSITORY"]
        assert Path(repository) == Path(os.path.normpath(destination)), dockerfile


# -- the GPU profile -------------------------------------------------------------------------------


def test_gpu_profile_reserves_an_nvidia_gpu_and_builds_the_tensorrt_image(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["dockerfile"] == GPU_DOCKERFILE
    (base,) = dockerfile_base_images(REPO / GPU_DOCKERFILE)
    release = re.fullmatch(r"nvcr\.io/nvidia/tensorrt:(\d\d)\.(\d\d)-py3", base)
    assert release is not None, base
    assert (int(release.group(1)), int(release.group(2))) >= (24, 5), "TensorRT 10 ships from NGC 24.05"
    cpu = services["worker"]
    assert "profiles" not in cpu and "deploy" not in cpu, "the CPU worker is the default and needs no GPU"


def test_gpu_plan_cache_volume_is_where_the_entrypoint_keeps_plans(services: dict[str, Any]) -> None:
    from tests.deploy.test_gpu_entrypoint import load_entrypoint

    entrypoint = load_entrypoint()
    image_env = dockerfile_env(REPO / GPU_DOCKERFILE)
    cache = image_env[entrypoint.PLAN_CACHE_ENV]
    assert Path(cache) == entrypoint.DEFAULT_PLAN_CACHE
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["worker-gpu"]["volumes"]}
    assert mounts.get(cache) == "trt-plans"
    instructions = dockerfile_instructions(REPO / GPU_DOCKERFILE)
    copied = next(shlex.split(a)[-1] for k, a in instructions if k == "COPY" and "docker/gpu_entrypoint.py" in a)
    (entry,) = [json.loads(a) for k, a in instructions if k == "ENTRYPOINT"]
    assert entry[0] == Path(copied).name and copied.startswith("/usr/local/bin/")
    # The plan must be built for as many streams as the worker runs.
    assert f"{ENV_PREFIX}ENGINE{ENV_NESTED_DELIMITER}STREAMS" in environment_of(services["worker-gpu"])


def test_shared_gpu_profile_wires_its_workers_to_the_engine_server(
    services: dict[str, Any], prometheus_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, worker = services["engine-server"], services["worker-shared-gpu"]
    assert server["profiles"] == worker["profiles"] == ["gpu-shared"]
    # The GPU belongs to the server, which needs TensorRT; its workers use the CPU image and no GPU.
    assert server["build"]["dockerfile"] == GPU_DOCKERFILE and worker["build"]["dockerfile"] == CPU_DOCKERFILE
    assert any(d["driver"] == "nvidia" for d in server["deploy"]["resources"]["reservations"]["devices"])
    assert "deploy" not in worker
    assert worker["depends_on"]["engine-server"]["condition"] == "service_healthy"
    assert server["command"] == ["engine-server"]

    server_settings = service_settings(services, "engine-server", monkeypatch)
    worker_settings = service_settings(services, "worker-shared-gpu", monkeypatch)
    socket_path = worker_settings.engine.server_socket
    assert server_settings.engine.server_socket == socket_path
    # The server refuses a client asking for more rows than its own max_rows; buckets and version must match.
    assert worker_settings.batching.max_rows <= server_settings.batching.max_rows
    assert worker_settings.batching.buckets == server_settings.batching.buckets
    assert worker_settings.engine.version == server_settings.engine.version

    # Both containers mount one named volume where the socket's folder is ...
    folder = str(Path(socket_path).parent)
    mounts = [{v.split(":")[1]: v.split(":")[0] for v in service["volumes"]} for service in (server, worker)]
    assert mounts[0].get(folder) is not None and mounts[0].get(folder) == mounts[1].get(folder)
    # ... which both images create and give to the same unprivileged user, since the socket is mode 0600.
    for dockerfile in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        runs = " ".join(a for k, a in dockerfile_instructions(REPO / dockerfile) if k == "RUN")
        assert re.search(rf"mkdir -p [^&]*{re.escape(folder)}", runs), dockerfile
        assert re.search(rf"chown (-R )?app:app [^&]*{re.escape(folder)}", runs), dockerfile
        assert "useradd --system --uid 10001" in runs, dockerfile

    # The server's plan is built by the entrypoint for as many streams as it runs, into the plan cache.
    assert f"{ENV_PREFIX}ENGINE{ENV_NESTED_DELIMITER}STREAMS" in environment_of(server)
    assert mounts[0].get(str(dockerfile_env(REPO / GPU_DOCKERFILE)["PLAN_CACHE_DIR"])) == "trt-plans"
    # Prometheus scrapes the server's metrics port.
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == f"{WORKER_JOB}-engine-server"]
    (config,) = job["dns_sd_configs"]
    assert config["names"] == ["engine-server"] and config["port"] == server_settings.metrics_port
    assert str(server_settings.metrics_port) in [str(port) for port in server["expose"]]


# -- Prometheus ------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_service_on_its_admin_port(
    services: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == WORKER_JOB]
    assert job.get("metrics_path", "/metrics") in OPEN_PATHS, "Prometheus has no admin token"
    configs = job["dns_sd_configs"]
    assert {n for config in configs for n in config["names"]} == set(WORKERS)
    for config in configs:
        assert config["type"] == "A"  # one record per replica: every scaled container is scraped
        for name in config["names"]:
            assert config["port"] == admin_port(services[name]), name


def test_prometheus_runs_the_mounted_config(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    assert (REPO / mounts[config_flag.partition("=")[2]]).resolve() == PROMETHEUS_CONFIG
