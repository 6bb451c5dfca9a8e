"""The serving normalizer is the model's input contract: the fast path must equal the plain definition."""

from __future__ import annotations

import html

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_sentiment.batching.normalization import _MENTION, _URL, _WHITESPACE, normalize_twitter_v1
from stream_sentiment.source.replay import sample_rows


def reference(text: str) -> str:
    """twitter-v1 as specified: unescape HTML, replace links and handles, collapse whitespace."""
    text = html.unescape(text)
    text = _URL.sub("http", text)
    text = _MENTION.sub("@user", text)
    return _WHITESPACE.sub(" ", text).strip()


TRICKY = ["WWW.Example.com x", "wWw.x.y", "HtTpS://A.b/c", "a\u3000b\x1c c\u2028d", "&amp;@user@x &lt;http://x&gt;",
          "&#64;handle", "@@a", "a@b.com", "  lead  trail\n", "", "\x85x\xa0y", "go to www.x.org!", "@united &amp; @AA",
          "httpſ://x", "HTTPſ://x", "x@a@b", "_@a", "é@a", "@", "a @", "x@@b @_ @é"]


def test_equals_the_definition_on_every_sample_tweet_and_tricky_text():
    texts = [row["text"] for row in sample_rows()] + TRICKY
    assert [normalize_twitter_v1(t) for t in texts] == [reference(t) for t in texts]


# Mostly the characters the fast path branches on, so links, handles and entities are generated often.
TRIGGERS = st.sampled_from(list("wW.:/htpsH@&#;amp lgt0123 \t\n\u3000\x1cé\u017f_"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=TRIGGERS | st.characters(), max_size=60))
def test_equals_the_definition_on_generated_text(text):
    assert normalize_twitter_v1(text) == reference(text)
