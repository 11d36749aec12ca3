"""Write a fixture of texts and their distill.tokenizer_np ids, which the JavaScript tokenizer
(distill/web/tokenizer.js) must reproduce exactly (tests/js/tokenizer.test.mjs).

Usage: .venv/bin/python tools/tokenizer_fixture.py OUT_DIR

OUT_DIR gets tokenizer/ (the vocabulary file and tokenizer.json, saved the way distill/export.py
puts them in an edge bundle) and tokenizer_fixture.json:
``{"texts": [...], "ids": [[...], ...], "context_length": L, "tokenizer_dir": "tokenizer",
"groups": [[name, count], ...], "unicode_version": Python's unicodedata version}`` (the texts
come in groups, in order).

The texts: the project's evaluation and caption prompts (Fashion-MNIST class names in the
templates of conf/data/offline.yaml), the Tux Paint captions (when tuxpaint-stamps-default is
installed), dictionary words (/usr/share/dict/words, else generated words), Unicode edge cases,
generated mojibake, and a sweep over the code points Python's unicodedata knows.
"""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from pathlib import Path

import yaml

from distill.datasets import FASHION_MNIST_CLASSES
from distill.tokenizer_np import DEFAULT_CONTEXT_LENGTH, NumpyTokenizer

REPO = Path(__file__).resolve().parents[1]

FIXTURE_FILE = "tokenizer_fixture.json"
WORDS_FILE = Path("/usr/share/dict/words")
N_WORDS = 3000


def _templates(node) -> list[str]:
    """Every string in a ``templates`` or ``caption_templates`` list anywhere in a parsed config."""
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("templates", "caption_templates") and isinstance(v, list):
                found += [t for t in v if isinstance(t, str)]
            else:
                found += _templates(v)
    elif isinstance(node, list):
        for v in node:
            found += _templates(v)
    return found


def prompt_texts() -> list[str]:
    """Fashion-MNIST class names (as evaluated, and lower-cased as captioned) in offline.yaml's templates."""
    cfg = yaml.safe_load((REPO / "conf" / "data" / "offline.yaml").read_text())
    templates = list(dict.fromkeys(["a photo of a {}."] + _templates(cfg)))
    names = list(dict.fromkeys(FASHION_MNIST_CLASSES + [c.lower() for c in FASHION_MNIST_CLASSES]))
    return [t.format(n) for t in templates for n in names]


def tuxpaint_texts() -> list[str]:
    from distill.datasets import tuxpaint
    from distill.errors import MissingDataError

    try:
        return list(tuxpaint("all").captions or [])
    except MissingDataError:
        return []  # the Debian package is optional here


def word_texts(n: int = N_WORDS) -> list[str]:
    """A fixed sample of dictionary words plus all its non-ASCII ones; generated words without wamerican."""
    rng = random.Random(0)
    if WORDS_FILE.is_file():
        words = sorted({w.strip() for w in WORDS_FILE.read_text(encoding="utf-8", errors="replace").splitlines()
                        if w.strip()})
        return rng.sample(words, min(n, len(words))) + [w for w in words if not w.isascii()]
    syllables = [a + b + c for a in ("", "b", "ch", "d", "gr", "k", "l", "m", "pl", "s", "th")
                 for b in ("a", "e", "i", "o", "u", "ea", "ou") for c in ("", "n", "r", "st", "ck", "'s")]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(n)]


EDGE_CASES = [
    "", " ", "   \t\n  ", "\n\n\n", "\u3000\u00a0\u2003", "\x1c\x1d\x1e\x1f", "\u200b", "\ufeff",
    "a photo of a cat.", "A PHOTO OF A DOG!!!", "  lots   of\twhitespace \n and newlines  ",
    "numbers 1234567 and 3.14159, 1st 2nd 10,000", "punctuation: ()[]{}<>?!@#$%^&*_-+=~`|\\/;:'\",.",
    "contractions: it's don't they're we've I'm you'll he'd IT'S DON'T THEY'RE", "it'ſ", "'K 'S 'LL",
    "unicode: café naïve façade résumé Ærøskøbing straße ẞ İstanbul ıi",
    "decomposed: cafe\u0301 nai\u0308ve A\u030a n\u0303 \u1100\u1161\u11a8", "iota \u03b1\u0345 x\u0345y -\u0345-",
    "日本語のテキスト 中文 한국어 ｶﾀｶﾅ ﾊﾝｶｸ", "emoji 🐱🐶 and symbols ™ © ® ° ½ ² ³ ①②③ Ⅻ",
    "👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 👍🏽 #️⃣ ✔️ 😀😃😄😁😆😅🤣😂🙂🙃😉😊",
    "Ελληνικά ΟΔΟΣ ΟΔΟΣ. Σ σ ς и кириллица العربية עברית हिन्दी ไทย ქართული ᏣᎳᎩ",
    "digits ٠١٢٣ ०१२३ ๐๑๒ １２３ 𝟘𝟙𝟚",
    "html &amp; entities &lt;b&gt; &amp;amp; &quot;q&quot; &#39;s &#x27;t &nbsp;x &copy; &euro;",
    "legacy &amp &lt &notin &notit; &copy2024 &Eacute &eacuteX &amp;lt;", "this&not that",
    "&#0; &#13; &#128; &#150; &#x80; &#xD800; &#1114112; &#99999999999999999999; &#65534; &#x1F600; &#xFDD0;",
    "P&EACUTE;REZ BUNDESSTRA&SZLIG;E &ntilde; &Ntilde; &NTILDE; &nTILDE; &Jscr;ohn &HilbertSpace;ancock",
    "&checkmark; &hellip; &mdash; &lsquo;x&rsquo; &ldquo;y&rdquo; &frac12; &NewLine; &Tab; &ThickSpace;",
    "a < b &amp; c", "first line &amp;\nsecond <b> line &amp;\nthird &amp;", "<start_of_text> &lt;end_of_text&gt;",
    "<start_of_text> literal special tokens <end_of_text>",
    "<START_OF_TEXT> <ſtart_of_text> <end_of_text><end_of_text>",
    "curly ‘quotes’ and “double” ‚low„ ʼn ﬁnance ﬂoor ﬃ ﬆ Ĳssel ǅ ǈ full-width ＡＢＣ１２３！ ＬＯＵＤ　ＮＯＩＳＥＳ",
    "zero\u200bwidth and combining e\u0301 accents \u200d\u200c\u200e\u200f\u202a\u202e",
    "controls \x00\x01\x07\x08\x0b\x0c\x0e\x7f \x85 \u2028 \u2029 \r\n \r \u206a \ufff9\ufffc end",
    "ansi \x1b[36;44mI'm blue\x1b[0m \x1b[1m\x1b[31mred\x1b[0m \x1b[٣m", "lone \ud800 surrogates \udfff \ud83d x",
    "c1 \x80\x81\x8d\x8f\x90\x9d\x93quoted\x94 \x96 \x85", "replacement \ufffd\ufffd char",
    "cafÃ©", "sÃ³", "voilÃ le travail", "Ã la mode", "Ã  la mode", "fÃ cil", "Ã s vezes Ã quele",
    "âœ” No problems", "&macr;\\_(ã\x83\x84)_/&macr;", "Broken text&hellip; it&#x2019;s ﬂubberiﬁc!",
    "â€œ like this â€\ufffd", "â€œquotedâ€\x9d", "l’humanitÃ©", "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
    "ÃƒÂ©", "Ã©Ã¨Ãª Ã¤Ã¶Ã¼ ÃŸ", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚ Ð¼Ð¸Ñ€", "РџСЂРёРІРµС‚", "вЂњHelloвЂќ", "ÎšÎ±Î»Î·Î¼Î­ÏÎ±",
    "ØµØ¨Ø§Ø­ Ø§Ù„Ø®ÙŠØ±", "ã\x81\x93ã‚“ã\x81«ã\x81¡ã\x81¯", "æ—¥æœ¬èªž", "í•œêµ­ì–´", "ðŸ˜€ ðŸ‘\x8d",
    "í ½í¸€", "í ½í¸\x80\n", "\u00c0\u0080 java null", "Ã\xa0 la carte", "Ã¢â‚¬Å“doubleÃ¢â‚¬Â\x9d",
    "‚Äú MacRoman ‚Äù", "√©t√© caf√©", "‚Ä¢ bullet", "Ã¡rvore ÃÂ¡", "ÂŁ10 Â£10 Â· Â»", "Ã¼ber Ã–l",
    "PerÃº ni Ã±o", "piÃ±a colada, jalapeÃ±o", "naÃ¯ve cafÃ\xa9", "Ĺ‚Ăłdka", "Ă©tĂ©", "Ã©cole\nÃ©cole", "×² ×³",
    "Ã¨ Ã¨ Ã¨\nplain line\nÃ¨", "¯\\_(ツ)_/¯", "(╯°□°）╯︵ ┻━┻", "ಠ_ಠ", "Ò_Ó ô_ô", "│┌┐└┘ ═══",
    "£ € ¥ ¢ ₹ ₽ ₩ $100", "°C ±5 µm ×2 ÷3 ¼ ½ ¾ ≤ ≥ ≠ ∞ √ ∑ ∏ ∂", "§ ¶ † ‡ • … ‰ ‹ › « »",
    "word " * 200, "supercalifragilisticexpialidocious antidisestablishmentarianism" * 3,
    "日本語" * 60, "🐱" * 80, "a" * 500, "x " * 100 + "y", "!" * 300, "1" * 120, "don't " * 40,
    "a photo of a " + "very " * 80 + "big cat.",
]

_MOJIBAKE_SOURCES = [
    "café", "naïve", "résumé", "piñata", "Ærøskøbing", "straße", "Müller", "Łódź", "Český Krumlov",
    "Ελληνικά", "привет мир", "日本語のテキスト", "한국어", "中文", "✔ done", "“quoted” ‘text’", "emoji 🐱🐶",
    "€100", "naïve café — “déjà vu”", "mañana…", "Zürich ½ ¾", "à la carte", "São Paulo", "İstanbul",
    "Ἀθῆναι", "עברית", "العربية", "हिन्दी", "ไทย", "ſtraße", "ﬁnance", "™ © ®", "• bullet •",
]
_MOJIBAKE_CODECS = ["latin-1", "windows-1252", "windows-1251", "windows-1250", "windows-1253", "windows-1254",
                    "windows-1257", "iso-8859-2", "mac-roman", "cp437", "cp850", "koi8-r"]


def mojibake_texts() -> list[str]:
    """UTF-8 read as single-byte codecs (once and twice), with nbsp turned into space, or lost bytes."""
    out: list[str] = []
    for s in _MOJIBAKE_SOURCES:
        data = s.encode("utf-8")
        for codec in _MOJIBAKE_CODECS:
            once = data.decode(codec, errors="replace")
            out.append(once)
            out.append(once.replace("\xa0", " "))
            out.append(once.encode("utf-8").decode(codec, errors="replace"))
            out.append(f"The word is {once}, said the {codec} reader.")
    return list(dict.fromkeys(out))


def random_texts(n: int = 1500, seed: int = 0) -> list[str]:
    """Random strings over the characters ftfy's mojibake heuristics look at, plus ASCII and spaces."""
    rng = random.Random(seed)
    alphabet = ([chr(c) for c in range(0x20, 0x7f)] * 2 + [chr(c) for c in range(0x80, 0x180)]
                + list("€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ\ufffd") + [chr(c) for c in range(0x391, 0x3ca)]
                + [chr(c) for c in range(0x400, 0x460)] + list("│┌┐┘├┤┬┼═║╔╗╚╝▀▄█▌▐░▒▓√∂≠≤≥∞∑∏≈") + ["\n", "\xa0"] * 4)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def codepoint_texts(chunk: int = 16, big_block_stride: int = 37) -> list[str]:
    """Runs of ``chunk`` consecutive code points that Python's unicodedata has assigned (private use
    and surrogates left out; 16 are at most 64 UTF-8 bytes, so no id is lost to truncation); in the
    big ideograph/syllable blocks only every ``big_block_stride``-th."""
    big = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xA000, 0xA48C), (0x17000, 0x18CFF),
           (0x1B170, 0x1B2FB), (0x13000, 0x1342F), (0x12000, 0x1254F), (0x14400, 0x1467F), (0x16800, 0x16A38),
           (0x20000, 0x323AF)]
    cps = [cp for cp in range(0x110000)
           if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")
           and (not any(a <= cp <= b for a, b in big) or cp % big_block_stride == 0)]
    return ["".join(chr(c) for c in cps[i:i + chunk]) for i in range(0, len(cps), chunk)]


def fixture_groups() -> list[tuple[str, list[str]]]:
    return [("prompts", prompt_texts()), ("tuxpaint", tuxpaint_texts()), ("words", word_texts()),
            ("edge_cases", EDGE_CASES), ("mojibake", mojibake_texts()), ("random", random_texts()),
            ("codepoints", codepoint_texts())]


def build_fixture(out_dir: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Path:
    """Write out_dir/tokenizer/ and out_dir/tokenizer_fixture.json; return the JSON's path."""
    out = Path(out_dir)
    tok_dir = NumpyTokenizer(context_length=context_length).save(out / "tokenizer")
    tok = NumpyTokenizer.from_dir(tok_dir)
    groups = fixture_groups()
    # JSON pairs adjacent surrogate escapes into one character, so tokenize what the reader gets
    texts = json.loads(json.dumps([t for _, ts in groups for t in ts]))
    fixture = {"texts": texts, "ids": tok(texts).tolist(), "context_length": tok.context_length,
               "tokenizer_dir": tok_dir.name, "groups": [[name, len(ts)] for name, ts in groups],
               "unicode_version": unicodedata.unidata_version}
    path = out / FIXTURE_FILE
    path.write_text(json.dumps(fixture))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    p = build_fixture(sys.argv[1])
    print(f"wrote {p} ({len(json.loads(p.read_text())['texts'])} texts)")
