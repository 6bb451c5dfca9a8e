"""The post message contract: decode one Kafka record value into a :class:`Post` or a named rejection.

A valid message is UTF-8 JSON ``{"id": str, "text": str, "ts"?: epoch seconds
or ISO-8601, "topic"?: str, "region"?: str, "lang"?: str}`` (the JSON Schema is
``docs/message-schema.json``). Anything else is rejected with one reason from
:class:`RejectReason`, which names the dead-letter header and the counter label,
so bad input is never silently dropped and never crashes the consumer.

Decoding runs once per record on the worker's event loop, so a valid post takes one pass of
msgspec's C decoder into a typed struct (:func:`_valid_post`, ~1 µs against ~10 for the standard
library's decoder and the checks in Python); a record that pass cannot vouch for -- malformed,
of the wrong shape, failing a limit -- is decoded again by :func:`_checked_post`, the reference,
which names the reason. Both accept exactly the same posts (``tests/source/test_messages.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec

from stream_sentiment.source.language import post_language

OPTIONAL_STRING_FIELDS = ("topic", "region", "lang")
KNOWN_FIELDS = frozenset({"id", "text", "ts", *OPTIONAL_STRING_FIELDS})
# Epoch seconds beyond year 5138 are a unit mistake (milliseconds), not a date.
MAX_EPOCH_SECONDS = 1e11


class RejectReason(StrEnum):
    EMPTY_MESSAGE = "empty_message"
    MESSAGE_TOO_LARGE = "message_too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_ID = "missing_id"
    BAD_ID = "bad_id"
    MISSING_TEXT = "missing_text"
    BAD_TEXT = "bad_text"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    BAD_TIMESTAMP = "bad_timestamp"
    BAD_FIELD = "bad_field"
    INVALID_UNICODE = "invalid_unicode"
    # Not a decoding verdict: the post was admitted, but the engine fails on it alone (worker.py).
    ENGINE_ERROR = "engine_error"


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str


@dataclass(slots=True)
class Post:
    """A validated post. ``ts`` is epoch seconds, or None when the message had none.

    Immutable by convention, not frozen: one is made per post on the hot path, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``, four times the cost.
    """

    id: str
    text: str
    ts: float | None = None
    topic: str | None = None
    region: str | None = None
    lang: str | None = None


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """Admission limits; each bounds memory or work per message."""

    max_message_bytes: int = 65536
    max_text_chars: int = 5000
    max_id_chars: int = 256
    max_field_chars: int = 128


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds from a number or an ISO-8601 string (naive means UTC); None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not 0 <= value <= MAX_EPOCH_SECONDS:
        # Checked before float(): an integer of a few hundred digits overflows a float.
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
        except (ValueError, OverflowError, OSError):
            # fromisoformat raises ValueError; timestamp() of a date at the calendar's edges with an
            # offset can raise OverflowError or OSError.
            return None
    else:
        return None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_EPOCH_SECONDS:
        return None
    return seconds


def _unpaired_surrogate(value: str) -> int | None:
    """Index of the first lone UTF-16 surrogate in ``value`` (JSON's ``\\ud83d`` escape decodes to one), else None.

    Such a string is valid JSON but not text: it cannot be encoded as UTF-8, so the
    tokenizer raises on it and Redis's cjson refuses it.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _shown(value: object) -> str:
    """A short, safe rendering of a rejected value for the dead-letter detail.

    Only strings and numbers are shown, and only their start: ``repr`` of the value itself could be
    long, recurse through deep nesting, or (for an integer of more than 4,300 digits) raise.
    """
    if isinstance(value, str):
        return repr(value[:64])
    if isinstance(value, int) and abs(value) >= 10**64:
        return "(an integer of more than 64 digits)"
    if isinstance(value, int | float) or value is None:
        return repr(value)
    return f"(a JSON {type(value).__name__})"


_MISSING = object()
# One decoder for every record: ``json.loads`` with a keyword builds a new one per call.
_JSON = json.JSONDecoder(parse_constant=_reject_constant)


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    """The message's shape, for the one-pass decoder: what JSON types each field may have."""

    id: str
    text: str
    ts: float | str | None = None
    topic: str | None = None
    region: str | None = None
    lang: str | None = None


_MESSAGE = msgspec.json.Decoder(_Message)


def decode_post(raw: bytes | None, limits: MessageLimits = MessageLimits(),
                default_language: str = "en") -> Post | Rejection:
    """Validate one record value. Never raises on any input.

    The post's ``lang`` is always set: its declared tag's primary subtag, else its script's language
    (CJK), else ``default_language`` (``source.language``).
    """
    post = _valid_post(raw, limits, default_language)
    return post if post is not None else _checked_post(raw, limits, default_language)


def _valid_post(raw: bytes | None, limits: MessageLimits, default_language: str) -> Post | None:
    """The post, if ``raw`` is certainly valid; None where :func:`_checked_post` must decide (and name why).

    msgspec's decoder is as strict as the reference's: strict UTF-8, no NaN or trailing data, no lone
    surrogate escapes, duplicate keys the last one wins. A JSON integer ``ts`` arrives as a float: equal
    for every integer the limits accept (an integer outside them is refused either way).
    """
    if not raw or len(raw) > limits.max_message_bytes:
        return None
    try:
        message = _MESSAGE.decode(raw)
    except msgspec.MsgspecError:
        return None
    post_id, text, ts, topic, region, lang = (message.id, message.text, message.ts, message.topic,
                                              message.region, message.lang)
    if (not post_id.strip() or len(post_id) > limits.max_id_chars or not text.strip()
            or len(text) > limits.max_text_chars):
        return None
    # Only a JSON escape \uD800-\uDFFF can make a surrogate: msgspec refuses lone ones, the reference names them.
    if b"\\ud" in raw or b"\\uD" in raw:
        for value in (post_id, text, ts, topic, region, lang):
            if isinstance(value, str) and _unpaired_surrogate(value) is not None:
                return None
    if ts is not None and (ts := parse_timestamp(ts)) is None:
        return None
    longest = limits.max_field_chars
    if ((topic is not None and len(topic) > longest) or (region is not None and len(region) > longest)
            or (lang is not None and len(lang) > longest)):
        return None
    return Post(post_id, text, ts, topic or None, region or None, post_language(lang or None, text, default_language))


def _checked_post(raw: bytes | None, limits: MessageLimits, default_language: str) -> Post | Rejection:
    """The reference decoder: the post, or the first reason it is not one (the dead letter's header)."""
    if not raw:
        return Rejection(RejectReason.EMPTY_MESSAGE, "record has no value")
    if len(raw) > limits.max_message_bytes:
        return Rejection(RejectReason.MESSAGE_TOO_LARGE, f"{len(raw)} bytes > {limits.max_message_bytes}")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Rejection(RejectReason.NOT_UTF8, f"invalid UTF-8 at byte {error.start}")
    try:
        document = _JSON.decode(decoded)
    except (ValueError, RecursionError) as error:
        return Rejection(RejectReason.NOT_JSON, str(error)[:200])
    if not isinstance(document, dict):
        return Rejection(RejectReason.NOT_AN_OBJECT, f"top level is {type(document).__name__}")
    if not document.keys() <= KNOWN_FIELDS:
        unknown = sorted(set(document) - KNOWN_FIELDS)
        return Rejection(RejectReason.UNKNOWN_FIELD, f"unknown field(s): {', '.join(unknown)[:200]}")
    # Valid UTF-8 cannot carry a surrogate: only a JSON \u escape can make one.
    if "\\u" in decoded:
        for name in sorted(KNOWN_FIELDS & document.keys()):
            value = document[name]
            if isinstance(value, str) and (position := _unpaired_surrogate(value)) is not None:
                return Rejection(
                    RejectReason.INVALID_UNICODE, f"'{name}' holds an unpaired UTF-16 surrogate at character {position}"
                )

    post_id = document.get("id", _MISSING)
    if post_id is _MISSING:
        return Rejection(RejectReason.MISSING_ID, "no 'id'")
    if not isinstance(post_id, str) or not post_id.strip() or len(post_id) > limits.max_id_chars:
        return Rejection(RejectReason.BAD_ID, f"'id' must be a non-empty string of at most {limits.max_id_chars}")

    text = document.get("text", _MISSING)
    if text is _MISSING:
        return Rejection(RejectReason.MISSING_TEXT, "no 'text'")
    if not isinstance(text, str):
        return Rejection(RejectReason.BAD_TEXT, f"'text' is {type(text).__name__}, not a string")
    if not text.strip():
        return Rejection(RejectReason.EMPTY_TEXT, "'text' is empty")
    if len(text) > limits.max_text_chars:
        return Rejection(RejectReason.TEXT_TOO_LONG, f"{len(text)} characters > {limits.max_text_chars}")

    ts = None
    raw_ts = document.get("ts")
    if raw_ts is not None:
        ts = parse_timestamp(raw_ts)
        if ts is None:
            return Rejection(RejectReason.BAD_TIMESTAMP, f"'ts' {_shown(raw_ts)} is not epoch seconds or ISO-8601")

    # The optional fields one by one, in OPTIONAL_STRING_FIELDS's order (the first bad one is named): this runs
    # once per record on the event loop, and a loop building a dict of them cost more than the checks.
    longest = limits.max_field_chars
    topic = document.get("topic")
    if topic is not None and (not isinstance(topic, str) or len(topic) > longest):
        return Rejection(RejectReason.BAD_FIELD, f"'topic' must be a string of at most {longest}")
    region = document.get("region")
    if region is not None and (not isinstance(region, str) or len(region) > longest):
        return Rejection(RejectReason.BAD_FIELD, f"'region' must be a string of at most {longest}")
    lang = document.get("lang")
    if lang is not None and (not isinstance(lang, str) or len(lang) > longest):
        return Rejection(RejectReason.BAD_FIELD, f"'lang' must be a string of at most {longest}")
    return Post(post_id, text, ts, topic or None, region or None, post_language(lang or None, text, default_language))
