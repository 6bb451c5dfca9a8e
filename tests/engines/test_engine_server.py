"""The engine server and its client backend, over a real Unix socket, with ONNX Runtime behind the server.

The server's device backend here is the CPU one (the GPU ones cannot run in CI); what is tested is
what the server adds: sharing one loaded engine between clients, loading another version on request
and releasing it when its last client leaves, refusing what does not match, failing calls answered as
engine failures, and clients recovering when the server comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.config import Settings
from stream_sentiment.engines import wire
from stream_sentiment.engines.base import BackendUnavailableError, EngineError, TokenBatch
from stream_sentiment.engines.manifest import EngineRepositoryError
from stream_sentiment.engines.server import EngineServer
from stream_sentiment.engines.server_backend import EngineServerEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.service import open_engine
from stream_sentiment.worker import Worker
from tests.conftest import COMMITTED_ENGINE
from tests.engines.failing_engine import FailsOnToken
from tests.pipeline import pipeline_settings, produce_posts, run_until

TEXTS = ["worst flight ever, never again", "lovely crew, thanks so much", "gate 12", "I hate waiting on hold"]


def _until(condition, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """An engine repository with the committed v1 and a copy of it named v2."""
    root = tmp_path / "engines"
    for name in ("v1", "v2"):
        shutil.copytree(COMMITTED_ENGINE, root / "minilm-sentiment" / name, ignore=shutil.ignore_patterns("plans"))
    manifest = root / "minilm-sentiment" / "v2" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": "v1"', '"version": "v2"'))
    return root


def _server_settings(repository: Path, socket_path: Path, **engine: object) -> Settings:
    return Settings.load(engine={"backend": "onnxruntime", "streams": 2, "threads_per_stream": 1,
                                 "repository": str(repository), "server_socket": str(socket_path), **engine})


def _client_settings(repository: Path, socket_path: Path, **engine: object) -> Settings:
    return Settings.load(engine={"backend": "engine-server", "streams": 2, "repository": str(repository),
                                 "server_socket": str(socket_path), "call_timeout_s": 10.0, **engine})


@pytest.fixture
def batch(engine_version) -> TokenBatch:
    return pad_to_bucket(PostTokenizer(engine_version).encode(TEXTS), 32)


def test_scores_through_the_server_equal_the_local_engine(repository, socket_path, batch):
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        _, client = open_engine(_client_settings(repository, socket_path))
        assert isinstance(client, EngineServerEngine)
        _, local = open_engine(Settings.load(engine={"repository": str(repository), "threads_per_stream": 1}))
        with client, local:
            client.warm_up()
            for stream in range(client.streams):
                np.testing.assert_allclose(client.infer(batch, stream), local.infer(batch), atol=1e-6)
            assert server.hosted() == [{"model": "minilm-sentiment", "version": "v1", "buckets": [32, 64, 128, 256],
                                        "max_rows": 64, "clients": 2, "pinned": False, "lost_streams": []}]
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # only the service's user may connect
    assert not socket_path.exists()


def test_calls_on_the_event_loop_answer_as_on_a_thread_and_a_cancelled_one_costs_only_its_connection(
    repository, socket_path, batch
):
    """The worker's path (``infer_on_loop``, no slot thread) against the blocking one on the same connection, and a
    call cancelled with its answer still due (a call timeout, a shutdown): the connection goes, the slot is rebuilt."""
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        _, client = open_engine(_client_settings(repository, socket_path, streams=1))
        assert client.scores_on_event_loop

        async def on_loop() -> tuple[np.ndarray, type[BaseException] | None, np.ndarray]:
            first = await client.infer_on_loop(batch, 0)
            call = asyncio.create_task(client.infer_on_loop(batch, 0))
            await asyncio.sleep(0)  # the request is sent; the server needs milliseconds to answer
            assert not call.done()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            try:
                await client.infer_on_loop(batch, 0)
                unusable = None
            except EngineError as error:
                assert "rebuild" in str(error)
                unusable = type(error)
            await asyncio.get_running_loop().run_in_executor(None, client.rebuild, 0)
            return first, unusable, await client.infer_on_loop(batch, 0)

        with client:
            on_thread = client.infer(batch, 0)
            first, unusable, after_rebuild = asyncio.run(on_loop())
            np.testing.assert_array_equal(first, on_thread)
            assert unusable is EngineError
            np.testing.assert_array_equal(after_rebuild, on_thread)
            np.testing.assert_array_equal(client.infer(batch, 0), on_thread)  # blocking again on a thread
            # The server kept serving: the cancelled request's answer went to a closed connection.
            assert server.hosted()[0]["lost_streams"] == []


def test_clients_of_one_version_share_an_engine_and_a_hot_swap_loads_and_releases_another(
    repository, socket_path, batch
):
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        server.preload()  # v1, pinned: stays while no worker uses it
        _, first = open_engine(_client_settings(repository, socket_path))
        _, second = open_engine(_client_settings(repository, socket_path))
        with first, second:
            (v1,) = server.hosted()
            assert (v1["version"], v1["clients"], v1["pinned"]) == ("v1", 4, True)
            # A worker's hot swap opens the candidate the same way: the server loads v2 beside v1.
            _, candidate = open_engine(_client_settings(repository, socket_path), version="v2")
            with candidate:
                assert {h["version"]: h["clients"] for h in server.hosted()} == {"v1": 4, "v2": 2}
                np.testing.assert_allclose(candidate.infer(batch, 0), first.infer(batch, 1), atol=1e-6)
            # Its last client is gone (a rollback, or the swap's standby released): v2 leaves the GPU.
            _until(lambda: [h["version"] for h in server.hosted()] == ["v1"])
        _until(lambda: server.hosted()[0]["clients"] == 0)
        assert server.metrics.engines._value.get() == 1


def test_a_different_build_under_the_same_name_is_refused(repository, socket_path, engine_version):
    manifest = engine_version.manifest
    files = {**manifest.files, manifest.model_file: "0" * 64}
    other_build = dataclasses.replace(engine_version, manifest=dataclasses.replace(manifest, files=files))
    client = EngineServerEngine(other_build, socket_path=socket_path, max_rows=64)
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        with pytest.raises(EngineError, match="different builds"):
            client.activate()
        assert server.hosted() == []  # loaded for the check, released at once


def test_no_server_is_a_clear_unavailable_error(repository, socket_path):
    _, client = open_engine(_client_settings(repository, socket_path))
    with pytest.raises(BackendUnavailableError, match="stream-sentiment engine-server"):
        client.activate()


def test_a_failing_server_stream_is_an_engine_error_and_is_rebuilt(repository, socket_path, batch):
    settings = _server_settings(repository, socket_path, streams=1, fault_every_kth_call=2)
    with EngineServer(settings, open_engine) as server:
        _, client = open_engine(_client_settings(repository, socket_path, streams=1))
        with client:  # warm-up bypasses injected faults; live calls 2, 4, ... fail on the server
            client.infer(batch, 0)
            with pytest.raises(EngineError, match="injected fault"):
                client.infer(batch, 0)
            client.infer(batch, 0)  # the server rebuilt its stream; the connection is still good
            assert server.hosted()[0]["lost_streams"] == []
        assert server.metrics.calls.labels("engine_error")._value.get() == 1


def test_clients_reconnect_when_the_server_comes_back(repository, socket_path, batch):
    settings = _server_settings(repository, socket_path)
    _, client = open_engine(_client_settings(repository, socket_path, streams=1))
    with EngineServer(settings, open_engine):
        client.activate()
        expected = client.infer(batch, 0)
    try:
        with pytest.raises(EngineError, match="engine server"):
            client.infer(batch, 0)  # the server is gone
        with pytest.raises(EngineError):
            client.rebuild(0)  # nothing to reconnect to yet
        with EngineServer(settings, open_engine):
            client.rebuild(0)  # what the slot pool does after a failed call
            np.testing.assert_allclose(client.infer(batch, 0), expected, atol=1e-6)
    finally:
        client.deactivate()


def test_garbage_and_out_of_contract_requests_are_refused_and_the_server_keeps_serving(
    repository, socket_path, batch
):
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        with socket.socket(socket.AF_UNIX) as raw:  # not a frame at all: the connection is dropped
            raw.connect(str(socket_path))
            raw.sendall(b"\xff\xff\xff\xffjunk")
            raw.settimeout(5)
            try:
                assert raw.recv(100) == b""  # closed ...
            except ConnectionResetError:
                pass  # ... or reset, as the junk was never read
        with socket.socket(socket.AF_UNIX) as raw:  # a version name that is a path
            raw.connect(str(socket_path))
            wire.send_json(raw, wire.HELLO, {"protocol": wire.PROTOCOL, "model": "minilm-sentiment",
                                             "version": "../../etc", "buckets": [32], "max_rows": 8})
            kind, body = wire.recv_frame(raw)
            assert kind == wire.ERROR and "plain version name" in bytes(body).decode()
        with socket.socket(socket.AF_UNIX) as raw:  # more rows than the server allocates for
            raw.connect(str(socket_path))
            wire.send_json(raw, wire.HELLO, {"protocol": wire.PROTOCOL, "model": "minilm-sentiment", "version": "v1",
                                             "buckets": [32], "max_rows": 10**9})
            kind, body = wire.recv_frame(raw)
            assert kind == wire.ERROR and "batching.max_rows (64)" in bytes(body).decode()
        _, client = open_engine(_client_settings(repository, socket_path, streams=1))
        with client:
            too_long = TokenBatch(np.zeros((2, 48), np.int64), np.ones((2, 48), np.int64), 48)
            wire.send_frame(client._connections[0], wire.INFER, *wire.batch_parts(too_long))
            kind, body = wire.recv_frame(client._connections[0])
            assert kind == wire.ERROR and "outside what this client announced" in bytes(body).decode()
            client.infer(batch, 0)  # the same connection still serves
        assert server.metrics.calls.labels("bad_request")._value.get() == 3


def test_a_second_server_on_a_live_socket_refuses_to_start(repository, socket_path):
    settings = _server_settings(repository, socket_path)
    with EngineServer(settings, open_engine), pytest.raises(OSError, match="already listens"):
        EngineServer(settings, open_engine).start()


def test_settings_need_a_socket_for_the_server_backend_and_a_device_backend_for_the_server(repository):
    with pytest.raises(ValueError, match="server_socket"):
        Settings.load(engine={"backend": "engine-server"})
    with pytest.raises(ValueError, match="device backend"):
        EngineServer(Settings.load(engine={"backend": "engine-server", "server_socket": "/tmp/x.sock"}), open_engine)


def test_a_worker_on_the_engine_server_counts_every_post_once(
    kafka, topic_factory, redis_server, redis_factory, repository, socket_path
):
    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "served", partitions=2,
                                        engine={"backend": "engine-server", "streams": 2,
                                                "repository": str(repository), "server_socket": str(socket_path)})
    redis = redis_factory()
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 300, 1, seed=5))
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        version, engine = open_engine(settings)
        metrics = PipelineMetrics()
        with engine:
            engine.warm_up()
            worker = Worker(settings, engine, PostTokenizer(version), metrics=metrics)
            asyncio.run(run_until(worker, redis, "served", 300, produced - 300, within=90))
        assert server.metrics.rows.labels("minilm-sentiment")._value.get() >= 300
    assert int(redis.hget("served:totals", "scored")) == 300
    assert int(redis.hget("served:totals", "dead_lettered")) == produced - 300


def test_preloading_an_unknown_version_fails_with_the_repository_error(repository, socket_path):
    with EngineServer(_server_settings(repository, socket_path, version="v9"), open_engine) as server:
        with pytest.raises(EngineRepositoryError):
            server.preload()


def test_concurrent_requests_of_one_bucket_share_a_device_call_and_a_failing_one_fails_alone(
    repository, socket_path, engine_version
):
    tokenizer = PostTokenizer(engine_version)
    poison_id = tokenizer.encode(["zebra"])[0][1]  # a token id only the poison post carries

    def failing_open(settings: Settings):
        version, engine = open_engine(settings)
        return version, FailsOnToken(engine, poison_id)

    # Uneven rows and two buckets: a request gets back exactly its own rows, merged or not.
    texts = [[f"{t} #{i}" for t in TEXTS[: 1 + i % 4]] for i in range(6)]
    batches = [pad_to_bucket(tokenizer.encode(group), 32 if i % 2 else 64) for i, group in enumerate(texts)]
    poisoned = [*batches[:3], pad_to_bucket(tokenizer.encode(["zebra", *TEXTS[1:]]), 64), *batches[4:]]
    _, local = open_engine(Settings.load(engine={"repository": str(repository), "threads_per_stream": 1}))
    # One device stream, six client slots sending at once: requests queue, and queued ones are merged.
    with EngineServer(_server_settings(repository, socket_path, streams=1), failing_open) as server, local:
        metrics = server.metrics
        _, client = open_engine(_client_settings(repository, socket_path, streams=6))
        with client, ThreadPoolExecutor(6) as pool:
            for _ in range(5):
                futures = [pool.submit(client.infer, batch, slot) for slot, batch in enumerate(batches)]
                for future, batch in zip(futures, batches, strict=True):
                    np.testing.assert_allclose(future.result(), local.infer(batch), atol=1e-6)
            assert metrics.calls.labels("ok")._value.get() == 30
            assert metrics.batches.labels("minilm-sentiment")._value.get() < 30  # queued requests shared calls
            for _ in range(3):
                futures = [pool.submit(client.infer, batch, slot) for slot, batch in enumerate(poisoned)]
                for slot, (future, batch) in enumerate(zip(futures, poisoned, strict=True)):
                    if slot == 3:  # only the request holding the poison post fails, merged or not
                        with pytest.raises(EngineError, match="device-side assert"):
                            future.result()
                    else:
                        np.testing.assert_allclose(future.result(), local.infer(batch), atol=1e-6)
            assert server.hosted()[0]["lost_streams"] == []
        assert metrics.calls.labels("engine_error")._value.get() == 3


def test_a_group_takes_the_oldest_request_and_later_ones_of_its_bucket_up_to_the_largest_batch():
    from types import SimpleNamespace

    from stream_sentiment.engines.server_dispatch import EngineKey, EngineServerMetrics, HostedEngine, Request

    def request(rows: int, bucket: int) -> Request:
        ids = np.ones((rows, bucket), np.int64)
        return Request(TokenBatch(ids, ids, bucket), client=None, metrics=None)  # type: ignore[arg-type]

    hosted = HostedEngine(EngineKey("minilm-sentiment", "v1", (32, 64), 8), None,  # type: ignore[arg-type]
                          SimpleNamespace(streams=1), 30522, EngineServerMetrics())  # type: ignore[arg-type]
    queued = [request(3, 32), request(4, 64), request(4, 32), request(1, 32), request(2, 32)]
    hosted.pending.extend(queued)
    assert hosted.take_group() == [queued[0], queued[2], queued[3]]  # 3 + 4 + 1 rows: 2 more would pass 8
    assert list(hosted.pending) == [queued[1], queued[4]]  # the other bucket, and what did not fit, in order
    assert hosted.take_group() == [queued[1]]
    assert hosted.take_group() == [queued[4]]


def test_token_ids_outside_the_vocabulary_are_refused_before_they_reach_the_device(repository, socket_path, batch):
    with EngineServer(_server_settings(repository, socket_path), open_engine) as server:
        _, client = open_engine(_client_settings(repository, socket_path, streams=1))
        with client:
            for ids in (np.full((1, 32), 30522), np.full((1, 32), -1)):
                bad = TokenBatch(ids.astype(np.int64), np.ones((1, 32), np.int64), 32)
                with pytest.raises(EngineError, match="outside the vocabulary"):
                    client.infer(bad, 0)
            client.infer(batch, 0)
        assert server.metrics.calls.labels("bad_request")._value.get() == 2


def test_a_client_gone_while_its_request_waits_does_not_stop_the_server(repository, socket_path, batch):
    with EngineServer(_server_settings(repository, socket_path, streams=1), open_engine) as server:
        _, client = open_engine(_client_settings(repository, socket_path, streams=1))
        with client:
            connection = client._connections[0]
            for _ in range(20):  # requests pile up behind one stream; then the connection goes
                wire.send_frame(connection, wire.INFER, *wire.batch_parts(batch))
            connection.close()
            client._connections[0] = None
            client.rebuild(0)  # a new connection, as the slot pool makes after a failure
            np.testing.assert_allclose(client.infer(batch, 0).sum(axis=1), 1.0, atol=1e-5)
        _until(lambda: server.metrics.clients._value.get() == 0)
