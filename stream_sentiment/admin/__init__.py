"""The worker's admin surface: an HTTP server (health, readiness, metrics, engine management) and its client.

Kept apart from the data path: the server only parses requests, checks the bearer token and maps refusals
to status codes, and reaches the worker through the :class:`~stream_sentiment.admin.control.EngineControl`
seam, so the HTTP rules and the engine life cycle are tested separately.
"""
