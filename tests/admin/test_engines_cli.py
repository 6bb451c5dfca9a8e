"""``stream-sentiment engines`` against a live admin server: exit codes, the token's sources, the output."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from stream_sentiment.admin.control import ValidationFailedError
from stream_sentiment.admin.server import AdminServer
from stream_sentiment.cli import EXIT_UNAVAILABLE, main
from stream_sentiment.config import AdminSettings
from stream_sentiment.metrics import PipelineMetrics
from tests.admin.test_server import TOKEN, RecordingControl

TOKEN_ENVS = ("STREAM_SENTIMENT_ADMIN_TOKEN", "STREAM_SENTIMENT_ADMIN__TOKEN")


class ServerThread:
    """An AdminServer on its own event loop in a thread, so the blocking CLI can call it from the test."""

    def __init__(self, control: RecordingControl, token: str | None = TOKEN) -> None:
        self.control = control
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = AdminServer(AdminSettings(port=0, token=SecretStr(token) if token else None), control,
                                  PipelineMetrics())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def live() -> Iterator[ServerThread]:
    with ServerThread(RecordingControl()) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


def test_list_with_a_token_file(live: ServerThread, token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["engines", "--admin-url", live.url, "--admin-token-file", str(token_file), "list"])
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["active"] == "v1"
    assert {e["version"] for e in answer["engines"]} == {"v1", "v2"}


def test_flags_may_follow_the_action(live: ServerThread, token_file: Path) -> None:
    assert main(["engines", "list", "--admin-url", live.url, "--admin-token-file", str(token_file)]) == 0


@pytest.mark.parametrize("env", TOKEN_ENVS)
def test_activate_with_the_token_from_the_environment(
    live: ServerThread, env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(env, TOKEN)
    assert main(["engines", "--admin-url", live.url, "activate", "v2"]) == 0
    assert json.loads(capsys.readouterr().out) == {"active": "v2", "previous": "v1"}
    assert live.control.activations == [("activate", "v2")]


def test_rollback(live: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN_TOKEN", TOKEN)
    assert main(["engines", "--admin-url", live.url, "rollback"]) == 0
    assert live.control.calls == [("rollback",)]


def test_a_failed_validation_exits_1_with_the_reason(
    token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "accuracy 0.41 below 0.85 on the validation set; v1 keeps serving"
    with ServerThread(RecordingControl(activate_error=ValidationFailedError(reason))) as live:
        code = main(["engines", "--admin-url", live.url, "--admin-token-file", str(token_file), "activate", "v2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "422" in err
    assert reason in err


def test_a_path_like_version_is_refused(
    live: ServerThread, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["engines", "--admin-url", live.url, "--admin-token-file", str(token_file), "activate", "../../etc"])
    assert code == 1
    assert "400" in capsys.readouterr().err
    assert live.control.calls == []


def test_no_token_exits_1_with_401_and_says_this_command_lacks_it(
    live: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["engines", "--admin-url", live.url, "list"]) == 1
    err = capsys.readouterr().err
    assert "refused (401)" in err
    assert f"this command has no admin token: set STREAM_SENTIMENT_ADMIN_TOKEN or pass --admin-token-file with " \
           f"the token the worker at {live.url} was started with" in err
    assert live.control.calls == []


def test_a_wrong_token_is_named_with_where_it_came_from(
    live: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "old-token"
    wrong.write_text("last-years-token\n")
    assert main(["engines", "--admin-url", live.url, "--admin-token-file", str(wrong), "list"]) == 1
    err = capsys.readouterr().err
    assert f"has a different admin token than this command's (from --admin-token-file {wrong})" in err
    assert "last-years-token" not in err


def test_a_worker_without_a_token_is_named_as_the_side_to_fix(
    token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker started without a token refuses every admin call: the message must not blame the client."""
    with ServerThread(RecordingControl(), token=None) as worker:
        assert main(["engines", "--admin-url", worker.url, "--admin-token-file", str(token_file), "list"]) == 1
        err = capsys.readouterr().err
        assert "refused (403): this worker has no admin token configured" in err
        assert f"the worker at {worker.url} was started without an admin token" in err
        assert f"this command's token (from --admin-token-file {token_file}) is not at fault" in err
        assert main(["engines", "--admin-url", worker.url, "list"]) == 1
        assert "(this command sent none); restart the worker with STREAM_SENTIMENT_ADMIN_TOKEN" in \
               capsys.readouterr().err
        assert worker.control.calls == []


def test_the_default_url_comes_from_the_settings(
    live: ServerThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(f'[admin]\nport = {live.server.port}\ntoken = "{TOKEN}"\n')
    assert main(["engines", "--config", str(config), "list"]) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_server_exits_3(token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code = main(["engines", "--admin-url", url, "--admin-token-file", str(token_file), "list"])
    assert code == EXIT_UNAVAILABLE
    assert "cannot reach" in capsys.readouterr().err


def test_a_missing_token_file_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["engines", "--admin-url", "http://127.0.0.1:1", "--admin-token-file",
                 str(tmp_path / "nope"), "list"]) == 2


def test_run_passes_the_admin_flags_to_the_settings(token_file: Path) -> None:
    from stream_sentiment.cli import build_parser
    from stream_sentiment.cli.service import run_settings

    args = build_parser().parse_args(["run", "--admin-host", "0.0.0.0", "--admin-port", "9000",
                                      "--admin-token-file", str(token_file)])
    admin = run_settings(args).admin  # type: ignore[attr-defined]
    assert (admin.host, admin.port, admin.token_file, admin.read_token()) == ("0.0.0.0", 9000, token_file, TOKEN)


def test_run_takes_the_issues_token_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_sentiment.cli import build_parser
    from stream_sentiment.cli.service import run_settings

    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN_TOKEN", TOKEN)
    admin = run_settings(build_parser().parse_args(["run"])).admin  # type: ignore[attr-defined]
    assert (admin.host, admin.port, admin.read_token()) == ("127.0.0.1", 8081, TOKEN)
