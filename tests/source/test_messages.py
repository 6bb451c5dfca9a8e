"""The message contract: every malformed input gets a named reason, and the JSON Schema agrees."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_sentiment.source.messages import MessageLimits, Post, Rejection, RejectReason, decode_post

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "message-schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())

VALID = [
    {"id": "1", "text": "hello"},
    {"id": "2", "text": "late again", "ts": 1732262400, "topic": "airline", "region": "us", "lang": "en"},
    {"id": "3", "text": "ok", "ts": "2026-11-22T09:30:00Z"},
    {"id": "4", "text": "ok", "ts": "2026-11-22T09:30:00+01:00", "topic": None},
    {"id": "5", "text": "emoji 😡 and ünïcode", "ts": 1732262400.25},
]

INVALID_JSON_OBJECTS = [
    ({"text": "x"}, RejectReason.MISSING_ID),
    ({"id": 7, "text": "x"}, RejectReason.BAD_ID),
    ({"id": "  ", "text": "x"}, RejectReason.BAD_ID),
    ({"id": "1"}, RejectReason.MISSING_TEXT),
    ({"id": "1", "text": ["x"]}, RejectReason.BAD_TEXT),
    ({"id": "1", "text": "   "}, RejectReason.EMPTY_TEXT),
    ({"id": "1", "text": "x" * 5001}, RejectReason.TEXT_TOO_LONG),
    ({"id": "1", "text": "x", "ts": "yesterday"}, RejectReason.BAD_TIMESTAMP),
    ({"id": "1", "text": "x", "ts": -5}, RejectReason.BAD_TIMESTAMP),
    ({"id": "1", "text": "x", "ts": 1732262400000}, RejectReason.BAD_TIMESTAMP),  # milliseconds
    ({"id": "1", "text": "x", "ts": True}, RejectReason.BAD_TIMESTAMP),
    ({"id": "1", "text": "x", "region": 44}, RejectReason.BAD_FIELD),
    ({"id": "1", "text": "x", "topic": "t" * 129}, RejectReason.BAD_FIELD),
    ({"id": "1", "text": "x", "user": "bob"}, RejectReason.UNKNOWN_FIELD),
]


@pytest.mark.parametrize("document", VALID)
def test_valid_messages_decode_and_match_the_schema(document):
    post = decode_post(json.dumps(document).encode())
    assert isinstance(post, Post)
    assert post.id == document["id"] and post.text == document["text"]
    VALIDATOR.validate(document)


def test_iso_and_epoch_timestamps_agree():
    iso = decode_post(b'{"id":"a","text":"x","ts":"2026-11-22T09:30:00Z"}')
    epoch = decode_post(b'{"id":"a","text":"x","ts":1795339800}')
    assert isinstance(iso, Post) and isinstance(epoch, Post) and iso.ts == epoch.ts == 1795339800.0


@pytest.mark.parametrize(("document", "reason"), INVALID_JSON_OBJECTS)
def test_invalid_objects_are_rejected_with_their_reason_and_by_the_schema(document, reason):
    result = decode_post(json.dumps(document).encode())
    assert isinstance(result, Rejection) and result.reason is reason and result.detail
    assert not VALIDATOR.is_valid(document)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, RejectReason.EMPTY_MESSAGE),
        (b"", RejectReason.EMPTY_MESSAGE),
        (b"\xff\xfe{", RejectReason.NOT_UTF8),
        (b"{not json", RejectReason.NOT_JSON),
        (b'{"id":"1","text":"x","ts":NaN}', RejectReason.NOT_JSON),
        (b"[" * 100_000, RejectReason.NOT_JSON),  # deep nesting must not crash the decoder
        (b'"just a string"', RejectReason.NOT_AN_OBJECT),
        (b"[1, 2]", RejectReason.NOT_AN_OBJECT),
    ],
)
def test_undecodable_records_are_rejected_with_their_reason(raw, reason):
    result = decode_post(raw, MessageLimits(max_message_bytes=1_000_000))
    assert isinstance(result, Rejection) and result.reason is reason


def test_oversized_records_are_rejected_before_parsing():
    raw = json.dumps({"id": "1", "text": "x" * 100}).encode()
    result = decode_post(raw, MessageLimits(max_message_bytes=50))
    assert isinstance(result, Rejection) and result.reason is RejectReason.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"id":"a","text":"\ud83d"}',
        rb'{"id":"a","text":"fine \ude00 then not"}',  # a low surrogate alone
        rb'{"id":"a","text":"reversed \ude00\ud83d"}',
        rb'{"id":"\ud83d","text":"x"}',
        rb'{"id":"a","text":"x","topic":"\ud83d"}',
        rb'{"id":"a","text":"x","region":"us\udfff"}',
        rb'{"id":"a","text":"x","lang":"\ud800"}',
        rb'{"id":"a","text":"x","ts":"2026-11-22\ud83d"}',
    ],
)
def test_lone_surrogate_escapes_are_rejected_as_invalid_unicode(raw):
    # Valid UTF-8 bytes and valid JSON, but not text: the tokenizer and Redis's cjson both refuse it.
    result = decode_post(raw)
    assert isinstance(result, Rejection) and result.reason is RejectReason.INVALID_UNICODE, result
    assert result.detail.encode("utf-8")  # the dead-letter header can carry it


def test_a_paired_surrogate_escape_is_an_emoji_and_is_accepted():
    post = decode_post(rb'{"id":"a\ud83d\ude00","text":"so happy \ud83d\ude00","topic":"\ud83d\ude00"}')
    assert isinstance(post, Post)
    assert post.id == "a😀" and post.text == "so happy 😀" and post.topic == "😀"


def test_every_reason_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "message-schema.md").read_text()
    assert [reason for reason in RejectReason if f"`{reason}`" not in doc] == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_decode_to_a_post_or_a_named_rejection(raw):
    result = decode_post(raw)
    assert isinstance(result, Post) or (isinstance(result, Rejection) and result.reason in RejectReason)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "text", "ts", "topic", "region", "lang", "x"]), json_values))
def test_decoder_and_schema_agree_on_arbitrary_objects(document):
    accepted = isinstance(decode_post(json.dumps(document).encode()), Post)
    assert accepted == VALIDATOR.is_valid(document), document


@pytest.mark.parametrize(
    "ts",
    [
        "9" * 401,  # overflows a float: this record used to stop its partition for good
        "-" + "9" * 401,
        "1" + "0" * 4000,
        '"0001-01-01T00:00:00+01:00"',  # before the epoch's calendar floor once the offset is applied
        '"9999-12-31T23:59:59-01:00"',  # after year 9999 in UTC
        "1e400",  # json reads this as inf
        "[[[[[[[[[[1]]]]]]]]]]",
        '{"a": 1}',
    ],
)
def test_hostile_timestamps_are_bad_timestamps_not_crashes(ts):
    raw = b'{"id":"a","text":"x","ts":' + ts.encode() + b"}"
    result = decode_post(raw)
    assert isinstance(result, Rejection), result
    assert result.reason in (RejectReason.BAD_TIMESTAMP, RejectReason.NOT_JSON), result
    assert len(result.detail) < 300


# Any JSON value, including the ones a fuzzer of the wire would try: huge integers, deep nesting,
# NaN-free floats at the extremes, surrogates and other odd text.
hostile_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**1000)
    | st.integers(min_value=-(10**1000), max_value=-(10**300))
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.text(st.characters(codec=None, categories=["Cs", "Co", "Cc", "Zs", "Lo"]), max_size=10)
    | st.sampled_from(["2026-11-22T09:30:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", ""])
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


def _encode_any(document: object) -> bytes:
    # ensure_ascii writes lone surrogates as \\u escapes, as a hostile producer would.
    return json.dumps(document, ensure_ascii=True).encode()


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "text", "ts", "topic", "region", "lang", "x"]), hostile_values))
def test_decode_post_never_raises_on_any_json_value_in_any_field(document):
    result = decode_post(_encode_any(document), MessageLimits(max_message_bytes=1_000_000))
    assert isinstance(result, Post) or (isinstance(result, Rejection) and result.reason in RejectReason)


@settings(max_examples=200, deadline=None)
@given(hostile_values, st.integers(min_value=1, max_value=3000))
def test_decode_post_never_raises_on_deeply_nested_values(value, depth):
    raw = b'{"id":"a","text":"x","ts":' + b"[" * depth + _encode_any(value) + b"]" * depth + b"}"
    result = decode_post(raw, MessageLimits(max_message_bytes=1_000_000))
    assert isinstance(result, Rejection) and result.reason in (RejectReason.BAD_TIMESTAMP, RejectReason.NOT_JSON)


# Mostly valid posts, each field at times at or past its limit, odd, or a surrogate: where the one-pass
# decoder and the reference could part ways.
near_valid_text = st.text(max_size=12) | st.text(st.characters(codec=None, categories=["Cs", "Cc", "Zs", "Lo"]),
                                                 max_size=4)
near_valid = st.fixed_dictionaries(
    {"id": near_valid_text, "text": near_valid_text},
    optional={"ts": st.integers(min_value=-10, max_value=2 * 10**11) | st.floats(allow_nan=False)
              | st.sampled_from(["2026-11-22T09:30:00Z", "2026-11-22 09:30", "x", "", None]) | st.booleans(),
              "topic": near_valid_text | st.none(), "region": near_valid_text | st.none(),
              "lang": st.sampled_from(["en", "zh-Hans", "EN_us", "", "x" * 9]) | st.none(), "x": st.none()},
)


@settings(max_examples=250, deadline=None)
@given(near_valid | st.dictionaries(st.sampled_from(["id", "text", "ts", "topic", "region", "lang"]), hostile_values),
       st.booleans(), st.integers(min_value=1, max_value=12))
def test_the_one_pass_decoder_and_the_reference_agree_on_every_record(document, ascii_only, limit):
    """decode_post's msgspec pass takes only posts the reference takes, and gives the same Post."""
    from stream_sentiment.source.messages import _checked_post

    raw = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    for limits in (MessageLimits(), MessageLimits(max_message_bytes=8 * limit, max_text_chars=limit,
                                                  max_id_chars=limit, max_field_chars=limit)):
        assert decode_post(raw, limits) == _checked_post(raw, limits, "en"), raw


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120) | st.text(max_size=120).map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_the_one_pass_decoder_and_the_reference_agree_on_any_bytes(raw):
    from stream_sentiment.source.messages import _checked_post

    assert decode_post(raw) == _checked_post(raw, MessageLimits(), "en"), raw


@pytest.mark.parametrize("raw", [
    b'{"id": "a", "text": "first", "text": "second"}',  # a duplicated key
    b'{"id": "a", "id": "b", "text": "x"}',
    b'{"id": "a", "text": "tab\there"}',  # a raw control character inside a string
    b'{"id": "a", "text": "nl\nhere"}',
    b'\xef\xbb\xbf{"id": "a", "text": "x"}',  # a UTF-8 byte-order mark
    b' \r\n\t{"id" : "a" ,\n "text":"x"}\n ',  # whitespace around everything
    b'{"\\u0069d": "a", "text": "x"}',  # an escaped key
    b'{"id": "a", "text": "x", "ts": 1.7e9}',  # an exponent timestamp
    b'{"id": "a", "text": "x", "ts": 1e400}',  # one that overflows a float
    b'{"id": "a", "text": "x", "ts": 17000000000000000000000000}',  # an integer past 64 bits
    b'{"id": "a", "text": "x", "ts": -0.0}',
    b'{"id": "a", "text": "\\ud83d\\ude00 ok", "lang": "zh"}',  # a paired surrogate escape
    b'{"id": "a", "text": "x"} trailing',
    b'{"id": 1, "text": "x"}',
    b'[{"id": "a", "text": "x"}]',
])
def test_the_one_pass_decoder_and_the_reference_agree_on_edge_cases_json_dumps_never_writes(raw):
    """The property tests build their records with json.dumps; these are what a hand-rolled producer might send
    instead. A msgspec upgrade that changed how any of them decodes would fail here, not count differently."""
    from stream_sentiment.source.messages import _checked_post

    assert decode_post(raw) == _checked_post(raw, MessageLimits(), "en"), raw
