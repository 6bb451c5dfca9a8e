"""A post's language: its ``lang`` field when it has a usable one, else what its script says.

Only the script is known without a language model, and the script settles only the CJK languages:
a post whose letters are mostly Han characters is ``zh`` (``ja`` when it also has kana, ``ko`` when
Hangul outweighs Han). Any other post gets ``default`` — the language the operator says untagged
posts are in (English for the sample streams): a Latin-script post cannot be told apart from French
by its script. A declared ``lang`` is reduced to its primary subtag (``zh-Hans-CN`` → ``zh``).

Per post this is a few C-speed scans: ``str.isascii`` settles most English posts at once.
"""

from __future__ import annotations

import re

_PRIMARY_SUBTAG = re.compile(r"[a-z]{2,3}")
_SEPARATORS = re.compile(r"[-_]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
# Letters of other scripts: what a CJK post must outweigh (ASCII letters and the rest of Latin,
# Greek, Cyrillic, Arabic, Hebrew, Devanagari, Thai).
_OTHER_LETTERS = re.compile(r"[A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0900-\u097f\u0e00-\u0e7f]")


def declared_language(value: str | None) -> str | None:
    """The primary subtag of a declared language tag, lower-cased; None when absent or not a tag."""
    if not value:
        return None
    primary = _SEPARATORS.split(value.strip().lower(), maxsplit=1)[0]
    return primary if _PRIMARY_SUBTAG.fullmatch(primary) else None


def script_language(text: str) -> str | None:
    """``zh``, ``ja`` or ``ko`` when CJK characters are at least half of the post's letters, else None."""
    if text.isascii():
        return None
    han = len(_HAN.findall(text))
    kana = len(_KANA.findall(text))
    hangul = len(_HANGUL.findall(text))
    cjk = han + kana + hangul
    if not cjk or 2 * cjk < cjk + len(_OTHER_LETTERS.findall(text)):
        return None
    if hangul > han:
        return "ko"
    return "ja" if kana else "zh"


def post_language(declared: str | None, text: str, default: str = "en") -> str:
    """The language a post is counted and routed by (module docstring)."""
    return declared_language(declared) or script_language(text) or default
