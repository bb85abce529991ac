"""CLIP-compatible byte-level BPE text tokenizer with Uni-Perceiver's extra special tokens.

Uni-Perceiver reuses OpenAI CLIP's BPE vocabulary (48,894 merges, 49,408 ids including
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407) and appends three ids of its own:
``<|mask|>`` = 49408, ``<|gen|>`` = 49409 and ``<|spe|>`` = 49410 (vocabulary size 49,411).
The ids must match the reference bit for bit, because checkpoints index their word-embedding
table with them; the test-suite checks parity with ``open_clip``'s tokenizer on real text.

Pipeline of :meth:`ClipTokenizer.encode`:

1. clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace, lower-case;
2. split into words with CLIP's pattern (contractions, letter runs, single digits, runs of
   other symbols), where ``<|startoftext|>``, ``<|endoftext|>``, ``<|gen|>`` and ``<|spe|>``
   are matched first and map straight to their ids. ``<|mask|>`` is deliberately *not* in the
   pattern (as in the reference), so 49408 never comes from text: only masking code emits it;
3. map each word's UTF-8 bytes to printable stand-in characters and apply the BPE merges,
   the last symbol of a word carrying the ``</w>`` end-of-word marker.

No start token is ever prepended. Padding uses id 0, which is also the real token ``!``: that
is why :meth:`ClipTokenizer.decode` never drops id 0 on its own; pass ``mask`` (or slice to the
true length) to remove padding.

The merge list ``bpe_simple_vocab_16e6.txt.gz`` is vendored next to this file (MIT, OpenAI;
see ``LICENSE-CLIP-BPE``). The code here is an independent implementation.
"""

from __future__ import annotations

import gzip
import html
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import ftfy
import regex

from uniperceiver.errors import UpctlError

if TYPE_CHECKING:  # torch is imported where a batch becomes tensors: tokenising text alone (the corpus
    import torch  # token cache's worker processes) never pays its ~1 s import

__all__ = [
    "SOT_ID",
    "EOT_ID",
    "MASK_ID",
    "GEN_ID",
    "SPE_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "NUM_MERGES",
    "NUM_BPE_IDS",
    "SPECIAL_TOKENS",
    "BPE_PATH",
    "TokenizerError",
    "ClipTokenizer",
    "clean_text",
    "get_tokenizer",
]

SOT_ID, EOT_ID, MASK_ID, GEN_ID, SPE_ID, PAD_ID = 49406, 49407, 49408, 49409, 49410, 0
VOCAB_SIZE = 49411
NUM_MERGES = 48894  # = 49152 - 256 - 2: CLIP uses only the first merges of the file
NUM_BPE_IDS = 49408  # 256 bytes + 256 bytes-with-</w> + merges + <|startoftext|>, <|endoftext|>

#: Special token text -> id, in id order.
SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType({
    "<|startoftext|>": SOT_ID,
    "<|endoftext|>": EOT_ID,
    "<|mask|>": MASK_ID,
    "<|gen|>": GEN_ID,
    "<|spe|>": SPE_ID,
})
#: Specials recognised inside text (``<|mask|>`` is not, matching the reference).
_TEXT_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|gen|>", "<|spe|>")

BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

_END_OF_WORD = "</w>"
_WORD_CACHE_LIMIT = 1 << 18  # distinct words kept per tokenizer before the cache is reset

_SPLIT_PATTERN = regex.compile(
    "|".join(regex.escape(t) for t in _TEXT_SPECIALS)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(UpctlError):
    """The vocabulary file is missing/corrupt, or an id/argument is out of range."""


def _byte_symbols() -> list[tuple[int, str]]:
    """Pair every byte value with the printable character that stands for it inside BPE.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, NBSP, soft
    hyphen) are shifted to code points 256, 257, ... in byte order. The list order (printable
    bytes first) is the order of the first 256 vocabulary ids, so id 0 is ``!``.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(printable)
    shifted = [b for b in range(256) if b not in kept]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + k)) for k, b in enumerate(shifted)]


def clean_text(text: str) -> str:
    """Normalise text the way the reference does before splitting (see module docstring)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Read the first NUM_MERGES merge pairs, failing with a message that names the file."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read the BPE merge list ({exc})") from exc
    body = lines[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}: line {number} is {line!r}, expected two BPE symbols")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise TokenizerError(
            f"{path}: has {len(merges)} merges, expected at least {NUM_MERGES} (CLIP BPE file)"
        )
    return merges


class ClipTokenizer:
    """CLIP byte-level BPE plus Uni-Perceiver's ``<|mask|>``, ``<|gen|>``, ``<|spe|>`` ids.

    Instances are immutable apart from a private per-word cache; share one through
    :func:`get_tokenizer` instead of loading the merge list repeatedly.
    """

    vocab_size: int

    def __init__(self, bpe_path: str | Path = BPE_PATH) -> None:
        path = Path(bpe_path)
        merges = _read_merges(path)
        symbols = _byte_symbols()
        vocab = [c for _, c in symbols]
        vocab += [c + _END_OF_WORD for _, c in symbols]
        vocab += [a + b for a, b in merges]
        vocab += list(SPECIAL_TOKENS)
        encoder = {tok: i for i, tok in enumerate(vocab)}
        if len(encoder) != VOCAB_SIZE:
            raise TokenizerError(
                f"{path}: builds {len(encoder)} distinct tokens, expected {VOCAB_SIZE}"
            )
        self.vocab_size = VOCAB_SIZE
        self._encoder = encoder
        self._decoder = vocab
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        # bytes -> stand-in characters, via latin-1 (one code point per byte) + str.translate
        self._byte_table = {b: c for b, c in symbols}
        char_to_byte = {c: b for b, c in symbols}
        # Bytes each BPE id stands for; a word-final piece carries the separating space.
        id_bytes: list[bytes] = []
        for tok in vocab[:SOT_ID]:
            ends = tok.endswith(_END_OF_WORD)
            core = tok[: -len(_END_OF_WORD)] if ends else tok
            id_bytes.append(bytes(char_to_byte[c] for c in core) + (b" " if ends else b""))
        self._id_bytes = id_bytes
        self._special_names = {i: t for t, i in SPECIAL_TOKENS.items()}
        self._cache: dict[str, tuple[int, ...]] = {
            t: (SPECIAL_TOKENS[t],) for t in _TEXT_SPECIALS
        }

    # ------------------------------------------------------------------ lookup helpers
    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry as spelled in the vocabulary (e.g. ``"cat</w>"``)."""
        try:
            return self._encoder[token]
        except KeyError:
            raise TokenizerError(f"token {token!r} is not in the CLIP BPE vocabulary") from None

    def id_to_token(self, token_id: int) -> str:
        """Vocabulary spelling of an id (byte stand-ins, ``</w>`` suffix, or special text)."""
        self._check_id(token_id)
        return self._decoder[token_id]

    @property
    def special_ids(self) -> frozenset[int]:
        """The five special ids (49406..49410); decode skips them by default."""
        return frozenset(SPECIAL_TOKENS.values())

    def _check_id(self, token_id: int) -> None:
        if not isinstance(token_id, int) or not 0 <= token_id < VOCAB_SIZE:
            raise TokenizerError(
                f"token id {token_id!r} is outside the vocabulary [0, {VOCAB_SIZE})"
            )

    # ------------------------------------------------------------------ BPE core
    def _merge_word(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word: always the best-ranked adjacent pair, all its occurrences
        left to right, until no adjacent pair is a known merge."""
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank = NUM_MERGES
            best: tuple[str, str] | None = None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best_rank, best = rank, pair
            if best is None:
                break
            left, right = best
            joined = left + right
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenised word (cached: corpora repeat words a lot)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
        symbols = list(chars[:-1]) + [chars[-1] + _END_OF_WORD]
        ids = tuple(self._encoder[s] for s in self._merge_word(symbols))
        if len(self._cache) >= _WORD_CACHE_LIMIT:
            self._cache = {t: (SPECIAL_TOKENS[t],) for t in _TEXT_SPECIALS}
        self._cache[word] = ids
        return ids

    def _words(self, text: str) -> Iterator[tuple[int, ...]]:
        if not isinstance(text, str):
            raise TokenizerError(f"text to tokenize must be a str, got {type(text).__name__}")
        for word in _SPLIT_PATTERN.findall(clean_text(text)):
            yield self._word_ids(word)

    # ------------------------------------------------------------------ public API
    def clean(self, text: str) -> str:
        """The cleaned, lower-cased text that :meth:`encode` splits."""
        return clean_text(text)

    def encode(self, text: str) -> list[int]:
        """Clean, lower-case and BPE-encode ``text``; specials written in it keep their ids.

        No start or end token is added.
        """
        return [i for ids in self._words(text) for i in ids]

    def encode_words(self, text: str) -> list[list[int]]:
        """BPE ids grouped per pre-tokenised word (a letter run, a digit, a symbol run, a
        contraction or a special token), so whole-word masking can mask all pieces of a word.
        ``sum(groups, [])`` equals :meth:`encode`."""
        return [list(ids) for ids in self._words(text)]

    def decode(
        self,
        ids: Iterable[int],
        skip_special: bool = True,
        *,
        mask: Iterable[bool] | None = None,
    ) -> str:
        """Turn ids back into text: words separated by single spaces, no trailing space.

        Id 0 is the real token ``!`` as well as padding, so it is never dropped on its own:
        pass ``mask`` (True = real token, as returned by :meth:`encode_batch`) or slice the ids
        to the true length. Special ids are skipped when ``skip_special`` is true, otherwise
        written as their text (``<|endoftext|>``) as separate words. Nothing stops decoding
        early (an ``<|endoftext|>`` in the middle is skipped, not a terminator).
        Invalid UTF-8 from a partial byte sequence becomes U+FFFD.
        """
        raw = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            values = [operator.index(v) for v in raw]
        except TypeError:
            raise TokenizerError(f"decode: ids must be integers, got {raw[:8]!r}...") from None
        if mask is not None:
            keep = mask.tolist() if hasattr(mask, "tolist") else list(mask)
            if len(keep) != len(values):
                raise TokenizerError(
                    f"decode: mask has {len(keep)} entries but there are {len(values)} ids"
                )
            values = [v for v, k in zip(values, keep) if k]
        pieces: list[str] = []
        run = bytearray()
        for value in values:
            self._check_id(value)
            if value < SOT_ID:
                run += self._id_bytes[value]
                continue
            if skip_special:
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            pieces.append(f" {self._special_names[value]} ")
        pieces.append(run.decode("utf-8", errors="replace"))
        return " ".join("".join(pieces).split())

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int,
        *,
        append_eot: bool = True,
        suffix: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad a batch.

        Each row is ``encode(text)[:room] + suffix + [EOT_ID if append_eot]`` where ``room``
        leaves space for the suffix and the EOT, so rows never exceed ``max_length`` and always
        end with the suffix/EOT. Returns ``(ids, mask)``: a LongTensor [B, L] padded with
        PAD_ID up to the longest row (L <= max_length; L = 0 when every row is empty) and a
        BoolTensor [B, L] that is True on real tokens.
        """
        if isinstance(texts, str):
            raise TokenizerError("encode_batch: texts must be a sequence of str, got one str")
        if not isinstance(max_length, int) or max_length < 1:
            raise TokenizerError(
                f"encode_batch: max_length must be a positive int, got {max_length!r}"
            )
        try:
            tail = [operator.index(t) for t in suffix]
        except TypeError:
            raise TokenizerError(f"encode_batch: suffix must hold integer ids, got {suffix!r}") from None
        for token_id in tail:
            self._check_id(token_id)
        if append_eot:
            tail.append(EOT_ID)
        room = max_length - len(tail)
        if room < 0:
            raise TokenizerError(
                f"encode_batch: max_length={max_length} cannot hold the suffix and EOT "
                f"({len(tail)} ids)"
            )
        import torch

        rows = [self.encode(text)[:room] + tail for text in texts]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, row in enumerate(rows):
            if row:
                ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[b, : len(row)] = True
        return ids, mask

    def __len__(self) -> int:
        return self.vocab_size


@lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """The shared tokenizer built from the vendored merge list (loaded once per process)."""
    return ClipTokenizer()
