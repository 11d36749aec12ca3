"""Torch-free CLIP tokenizer: open_clip's SimpleTokenizer (byte-level BPE) with numpy output.

Same BPE merges file (bpe_simple_vocab_16e6.txt.gz), same cleaning (ftfy.fix_text, double
html.unescape, whitespace collapse, lower case), same split regex, <start_of_text>/<end_of_text>
ids, and the same truncation (keep context_length - 1 tokens, then force <end_of_text> last).
Output: int64 numpy array (B, context_length), zero padded.

Why our own code: open_clip's tokenizer imports torch at module import, and the edge runtime
must not. The BPE is copied from open_clip/tokenizer.py (MIT, from OpenAI CLIP).

Optional dependencies, with documented fallbacks so an edge device needs only numpy:
- ``regex`` (for ``\\p{L}`` / ``\\p{N}``): without it, the letter and number classes are built
  from ``unicodedata`` categories (L* and N*), which is the same definition; results can only
  differ for code points whose category changed between the two modules' Unicode versions.
- ``ftfy``: without it, a stdlib subset of ``ftfy.fix_text`` is applied (NFC, curly quotes to
  straight, Latin ligatures, full-width ASCII to half-width, CRLF to LF, control characters
  removed). Mojibake repair (e.g. "Ã©" -> "é") is NOT done; for clean UTF-8 text the ids match.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONFIG_FILE = "tokenizer.json"
DEFAULT_CONTEXT_LENGTH = 77
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")


def default_bpe_path() -> Path:
    """The vocabulary file next to this module if present, else open_clip's copy (located without importing it)."""
    here = Path(__file__).with_name(VOCAB_FILE)
    if here.is_file():
        return here
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # find_spec does not execute open_clip (which imports torch)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{VOCAB_FILE} not found: pass bpe_path= (a bundle's tokenizer/ folder holds it)")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode character table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


# ------------------------------------------------------------------------------ cleaning

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'})
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "ſt", "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij", "\u01c7": "LJ",
                            "\u01c8": "Lj", "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj"})
_WIDTH = {c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}
_WIDTH[0x3000] = " "


def _fix_text_stdlib(text: str) -> str:
    """A stdlib subset of ftfy.fix_text (see module docstring for what is and is not covered)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_LIGATURES).translate(_QUOTES).translate(_WIDTH)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    return unicodedata.normalize("NFC", text)


def _load_fix_text():
    try:
        import ftfy

        return ftfy.fix_text
    except ImportError:
        return _fix_text_stdlib


def clean_text(text: str, fix_text=None) -> str:
    """open_clip's 'lower' cleaning: fix_text, double html.unescape, whitespace collapse, lower case."""
    text = (fix_text or _load_fix_text())(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


# ------------------------------------------------------------------------------ split pattern

@lru_cache()
def _category_class(prefix: str) -> str:
    """A ``re`` character class body with every code point whose unicodedata category starts with prefix."""
    ranges: list[tuple[int, int]] = []
    start = prev = None
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if start is None:
                start = cp
            elif cp != prev + 1:
                ranges.append((start, prev))
                start = cp
            prev = cp
    if start is not None:
        ranges.append((start, prev))

    def esc(cp: int) -> str:
        return f"\\U{cp:08x}"

    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


def _compile_pattern(use_regex: bool | None = None):
    special = "|".join(SPECIAL_TOKENS)
    if use_regex is not False:
        try:
            import regex

            return regex.compile(special + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        except ImportError:
            if use_regex:
                raise
    import re

    letters, numbers = _category_class("L"), _category_class("N")
    return re.compile(special + rf"""|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+""",
                      re.IGNORECASE)


# ------------------------------------------------------------------------------ tokenizer

class NumpyTokenizer:
    """open_clip SimpleTokenizer (clean='lower', no reduction) without torch.

    Args:
        bpe_path: the gzipped merges file (a bundle's ``tokenizer/bpe_simple_vocab_16e6.txt.gz``).
        context_length: L, the fixed output length.
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 use_regex: bool | None = None) -> None:
        self.byte_encoder = bytes_to_unicode()
        self.bpe_path = Path(bpe_path or default_bpe_path())
        with gzip.open(self.bpe_path) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in SPECIAL_TOKENS}
        self.pat = _compile_pattern(use_regex)
        self.fix_text = _load_fix_text()
        self.sot_token_id = self.encoder[SPECIAL_TOKENS[0]]
        self.eot_token_id = self.encoder[SPECIAL_TOKENS[1]]
        self.vocab_size = len(self.encoder)
        self.context_length = int(context_length)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kw) -> "NumpyTokenizer":
        """Load from a bundle's tokenizer/ folder (vocab file + tokenizer.json with context_length)."""
        path = Path(path)
        cfg = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
        kw.setdefault("context_length", int(cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)))
        return cls(bpe_path=path / cfg.get("vocab_file", VOCAB_FILE), **kw)

    def bpe(self, token: str) -> str:
        """One pre-token (byte-encoded) -> space-separated BPE symbols (copied from open_clip)."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """One string -> BPE ids without <start_of_text>/<end_of_text>."""
        ids: list[int] = []
        for token in self.pat.findall(clean_text(text, self.fix_text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """B strings -> (B, L) int64 ids: sot, tokens, eot, zeros; truncated with eot kept last."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = np.zeros((len(texts), length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[i, :len(ids)] = ids
        return out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the vocab file and tokenizer.json (context_length) into out_dir (a bundle's tokenizer/)."""
        import shutil

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.bpe_path, out / VOCAB_FILE)
        (out / CONFIG_FILE).write_text(json.dumps({"type": "clip_bpe", "vocab_file": VOCAB_FILE,
                                                   "context_length": self.context_length}, indent=1))
        return out
