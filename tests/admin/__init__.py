"""Tests of the admin HTTP server and the ``stream-sentiment engines`` client."""
