"""Engine build tooling: Q/DQ graph rewrites, float weights from an ONNX graph, TensorRT plan builds.

Kept apart from the runtime backends in ``engines/``: nothing here is needed to score a batch.
"""
