"""ONNX Runtime on CPU: the embedded default backend.

One ``InferenceSession`` per stream, each with its own intra-op thread pool of
``threads_per_stream`` threads, so concurrent batches do not fight over one
pool. A static INT8 model is a Q/DQ graph in TensorRT's form (signed, symmetric
activations); it is rewritten at load time, exactly, into the unsigned form
whose Q/DQ pairs ORT's x86 optimizer fuses into integer kernels (see
``engine_build.qdq_rewrite``; ``engines.rewrite_cache`` runs it in a child process
and caches its output per model checksum). A dynamic one (``calibrate --method dynamic``)
goes through the same rewrite, which only folds its int8-stored tables: its integer
MatMuls run as they are.
"""

from __future__ import annotations

import os

import numpy as np

from stream_sentiment.engines.base import Engine, EngineError, TokenBatch
from stream_sentiment.engines.manifest import EngineVersion


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        version: EngineVersion,
        streams: int = 1,
        threads_per_stream: int | None = None,
        allow_spinning: bool = False,
    ) -> None:
        super().__init__(version, streams)
        self.threads_per_stream = threads_per_stream or max(1, (os.cpu_count() or 1) // streams)
        # ORT's pool threads busy-wait after each run by default. With several
        # sessions (streams) sharing a few cores, the idle ones' spinning steals
        # the cores the busy one needs, so spinning is off unless asked for.
        self.allow_spinning = allow_spinning
        self._sessions: list[object | None] = []
        self._model: bytes | str = ""

    def _load_model(self) -> bytes | str:
        manifest = self.version.manifest
        if manifest.precision == "int8":
            from stream_sentiment.engines.manifest import PLANS_DIR
            from stream_sentiment.engines.rewrite_cache import cached_unsigned_model

            sha = manifest.files[manifest.model_file]
            return str(cached_unsigned_model(self.version.model_path, sha, self.version.path / PLANS_DIR))
        return str(self.version.model_path)

    def _new_session(self) -> object:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads_per_stream
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about folded initializers are noise
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return ort.InferenceSession(self._model, sess_options=options, providers=["CPUExecutionProvider"])

    def _activate_impl(self) -> None:
        self._model = self._load_model()
        self._sessions = [self._new_session() for _ in range(self.streams)]

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        session = self._sessions[stream]
        if session is None:
            raise EngineError(f"stream {stream} has no session")
        names = self.version.manifest.inputs
        feeds = {names[0]: batch.input_ids, names[1]: batch.attention_mask}
        try:
            (logits,) = session.run([self.version.manifest.output], feeds)  # type: ignore[attr-defined]
        except Exception as error:  # ORT raises its own exception types per failure
            raise EngineError(f"onnxruntime failed on stream {stream}: {error}") from error
        return np.asarray(logits)

    def _rebuild_impl(self, stream: int) -> None:
        self._sessions[stream] = None
        self._sessions[stream] = self._new_session()

    def _deactivate_impl(self) -> None:
        self._sessions = []
        self._model = ""
