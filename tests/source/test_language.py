"""A post's language: declared tag, else CJK script, else the configured default."""

from __future__ import annotations

import pytest

from stream_sentiment.source.language import declared_language, post_language, script_language
from stream_sentiment.source.messages import Post, decode_post


@pytest.mark.parametrize(("tag", "expected"), [
    ("zh", "zh"), ("zh-Hans-CN", "zh"), ("EN_us", "en"), (" fr ", "fr"), ("yue", "yue"),
    ("", None), (None, None), ("english", None), ("x1", None), ("-", None),
])
def test_a_declared_tag_keeps_its_primary_subtag(tag, expected):
    assert declared_language(tag) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("航班又延误了三个小时，太让人失望了", "zh"),
    ("#某航# 延误3小时 @客服 what??? 😡", "zh"),  # Han outweighs the Latin letters
    ("iPhone 15 Pro Max 真香", None),  # more Latin letters than Han: not settled by script
    ("新幹線が遅れています", "ja"),
    ("비행기가 또 연착됐어요 정말", "ko"),
    ("Flight delayed again, unbelievable", None),
    ("Café crème, très bien", None),
    ("😡😡😡 !!!", None),
    ("", None),
])
def test_the_script_settles_only_cjk(text, expected):
    assert script_language(text) == expected


def test_the_declared_tag_wins_then_the_script_then_the_default():
    assert post_language("en", "航班又延误了") == "en"
    assert post_language(None, "航班又延误了") == "zh"
    assert post_language("not a tag", "航班又延误了") == "zh"
    assert post_language(None, "Flight delayed") == "en"
    assert post_language(None, "Vuelo retrasado", default="es") == "es"


def test_decoded_posts_always_carry_a_language():
    post = decode_post('{"id": "1", "text": "地铁又停运了"}'.encode())
    assert isinstance(post, Post) and post.lang == "zh"
    post = decode_post(b'{"id": "2", "text": "ok", "lang": "pt-BR"}')
    assert isinstance(post, Post) and post.lang == "pt"
    post = decode_post(b'{"id": "3", "text": "ok"}', default_language="de")
    assert isinstance(post, Post) and post.lang == "de"
