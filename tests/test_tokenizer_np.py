"""distill.tokenizer_np gives the same ids as open_clip's tokenizer, with and without regex/ftfy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "",
    "a photo of a cat.",
    "A PHOTO OF A DOG!!!",
    "  lots   of\twhitespace \n and newlines  ",
    "numbers 1234567 and 3.14159, 1st 2nd 10,000",
    "punctuation: ()[]{}<>?!@#$%^&*_-+=~`|\\/;:'\",.",
    "contractions: it's don't they're we've I'm you'll he'd",
    "unicode: café naïve façade résumé Ærøskøbing straße",
    "日本語のテキスト 中文 한국어",
    "emoji 🐱🐶 and symbols ™ © ® ° ½ ² ³",
    "Ελληνικά и кириллица العربية עברית हिन्दी",
    "html &amp; entities &lt;b&gt; &amp;amp;",
    "<start_of_text> literal special tokens <end_of_text>",
    "curly ‘quotes’ and “double” ﬁnance full-width ＡＢＣ１２３",
    "zero\u200bwidth and combining e\u0301 accents",
    "word " * 200,
    "supercalifragilisticexpialidocious antidisestablishmentarianism" * 3,
]


def _open_clip_ids(texts, context_length):
    import open_clip

    return open_clip.tokenize(texts, context_length=context_length).numpy()


@pytest.mark.parametrize("context_length", [77, 16])
def test_matches_open_clip(context_length):
    from distill.tokenizer_np import NumpyTokenizer

    ours = NumpyTokenizer(context_length=context_length)(CORPUS)
    ref = _open_clip_ids(CORPUS, context_length)
    assert ours.dtype == np.int64 and ours.shape == (len(CORPUS), context_length)
    np.testing.assert_array_equal(ours, ref)
    # truncated rows end with eot; the empty string is sot, eot, zeros
    assert ours[15, -1] == ours[0, 1] == NumpyTokenizer().eot_token_id


def test_matches_get_tokenizer_vitb32():
    import open_clip

    from distill.tokenizer_np import NumpyTokenizer

    ref = open_clip.get_tokenizer("ViT-B-32")
    np.testing.assert_array_equal(NumpyTokenizer(context_length=77)(CORPUS), ref(CORPUS).numpy())


def test_save_and_from_dir(tmp_path):
    from distill.tokenizer_np import NumpyTokenizer

    d = NumpyTokenizer(context_length=24).save(tmp_path / "tok")
    tok = NumpyTokenizer.from_dir(d)
    assert tok.context_length == 24 and json.loads((d / "tokenizer.json").read_text())["context_length"] == 24
    np.testing.assert_array_equal(tok(CORPUS[:5]), _open_clip_ids(CORPUS[:5], 24))


# Run in a subprocess with `regex` / `ftfy` made unimportable (a None entry in sys.modules makes
# `import x` raise ImportError), then compare against open_clip in this process.
_HIDDEN = r"""
import json, sys
for m in {hidden!r}:
    sys.modules[m] = None
from distill.tokenizer_np import NumpyTokenizer
tok = NumpyTokenizer(context_length=77)
print(json.dumps({{"pat_module": type(tok.pat).__module__, "fix": tok.fix_text.__module__,
                   "ids": tok(json.loads(sys.argv[1])).tolist()}}))
"""


@pytest.mark.parametrize("hidden", [("regex",), ("regex", "ftfy")])
def test_stdlib_fallbacks(hidden):
    # The ftfy fallback does not repair mojibake; this corpus has none, so ids must be identical.
    code = _HIDDEN.format(hidden=list(hidden))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CORPUS)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["pat_module"] == "re"
    assert res["fix"] == ("distill.tokenizer_np" if "ftfy" in hidden else "ftfy")
    np.testing.assert_array_equal(np.array(res["ids"]), _open_clip_ids(CORPUS, 77))
