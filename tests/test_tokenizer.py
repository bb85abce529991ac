"""Tests for uniperceiver.tokenizers.text: CLIP BPE parity on real corpora and the upctl API.

Parity reference: ``open_clip.tokenizer.SimpleTokenizer`` (optional test dependency). Known,
intended differences from it (checked below, not hidden):

* open_clip spells its two specials ``<start_of_text>`` / ``<end_of_text>`` (same ids 49406 /
  49407) and its split pattern recognises only those spellings; ours recognises
  ``<|startoftext|>``, ``<|endoftext|>``, ``<|gen|>``, ``<|spe|>`` like Uni-Perceiver, so those
  strings differ. open_clip has no ids >= 49408.
* Cleaning and lower-casing are the same (open_clip's default ``clean="lower"``), so ordinary
  text must give identical ids.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest
import regex
import torch

from uniperceiver.errors import UpctlError
from uniperceiver.tokenizers.text import (
    BPE_PATH,
    EOT_ID,
    GEN_ID,
    MASK_ID,
    NUM_BPE_IDS,
    PAD_ID,
    SOT_ID,
    SPE_ID,
    VOCAB_SIZE,
    ClipTokenizer,
    TokenizerError,
    clean_text,
    get_tokenizer,
)

HAND_WRITTEN = [
    "a photo of a cat.",
    "Café &amp; naïve tourists in Zürich",
    "café &amp;amp; naïve",  # double-escaped entity: unescaped twice
    "Crème brûlée, jalapeño, façade, smörgåsbord, Ærøskøbing",
    "I ❤️ pizza 🍕🍕 and 😀!!",
    "emoji family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "What?!... No way -- really??? (yes) [no] {maybe} #tag @user $5.99 100%",
    "multiple     spaces\tand\ttabs\n\nand newlines   ",
    "   leading and trailing   ",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apostrophe&#39; &eacute;",
    "It's, they're, we've, I'm, you'll, he'd, can't, DON'T",
    "Numbers: 1234567890 3.14159 1,000,000 2nd 21st",
    "ALL CAPS SENTENCE WITH MiXeD CaSe",
    "Ελληνικά κείμενα και русский текст и 中文文本 日本語のテキスト 한국어",
    "mojibake CafÃ© should be fixed by ftfy",
    "tab\u00a0nbsp\u2009thin space and soft\u00adhyphen",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a",
    "",
    "!!!",
    "loooooool hmmmmmm aaaaaaaaaa ...... ----- 1111",  # repeated symbols: merge order matters
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def reference():
    open_clip_tokenizer = pytest.importorskip(
        "open_clip.tokenizer", reason="open_clip_torch (test extra) is not installed"
    )
    return open_clip_tokenizer.SimpleTokenizer()


def _datapath(name: str) -> str:
    utils = pytest.importorskip("gensim.test.utils", reason="gensim (mini extra) is not installed")
    return utils.datapath(name)


@pytest.fixture(scope="module")
def pang_lee() -> list[str]:
    """The 200 movie-review sentences, lines like ``__label__neg text`` (latin-1 encoded)."""
    lines = Path(_datapath("pang_lee_polarity.cor")).read_text(encoding="latin-1").splitlines()
    out = []
    for line in lines:
        label, text = line.split(" ", 1)
        assert label in ("__label__neg", "__label__pos")
        out.append(text)
    return out


@pytest.fixture(scope="module")
def lee_sentences() -> list[str]:
    """Every sentence of the Lee background corpus (300 news documents, UTF-8)."""
    docs = Path(_datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    return [s for d in docs for s in regex.split(r"(?<=[.!?])\s+", d.strip()) if s]


def _mismatches(tok: ClipTokenizer, reference, texts: list[str]) -> list[str]:
    return [t for t in texts if tok.encode(t) != reference.encode(t)]


# --------------------------------------------------------------------------- vocabulary
def test_vocabulary_layout(tok: ClipTokenizer) -> None:
    assert tok.vocab_size == VOCAB_SIZE == 49411 == len(tok)
    assert (SOT_ID, EOT_ID, MASK_ID, GEN_ID, SPE_ID, PAD_ID) == (49406, 49407, 49408, 49409, 49410, 0)
    assert tok.id_to_token(PAD_ID) == "!"  # padding shares its id with the real token '!'
    assert tok.id_to_token(256) == "!</w>"
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    assert tok.id_to_token(512) == "".join(lines[1].split())  # first merge
    assert tok.id_to_token(SOT_ID - 1) == "".join(lines[48894].split())  # last merge used
    assert "".join(lines[48895].split()) not in {tok.id_to_token(i) for i in range(SOT_ID - 5, SOT_ID)}
    for name, i in [("<|startoftext|>", SOT_ID), ("<|endoftext|>", EOT_ID), ("<|mask|>", MASK_ID),
                    ("<|gen|>", GEN_ID), ("<|spe|>", SPE_ID)]:
        assert tok.token_to_id(name) == i and tok.id_to_token(i) == name
    assert tok.special_ids == {SOT_ID, EOT_ID, MASK_ID, GEN_ID, SPE_ID}
    assert tok.token_to_id("cat</w>") == 2368


def test_vocabulary_matches_open_clip(tok: ClipTokenizer, reference) -> None:
    """Every ordinary id spells the same BPE symbol as in open_clip (49,406 ids)."""
    assert reference.vocab_size == NUM_BPE_IDS
    differing = [i for i in range(SOT_ID) if reference.decoder[i] != tok.id_to_token(i)]
    assert differing == []


def test_get_tokenizer_is_cached() -> None:
    assert get_tokenizer() is get_tokenizer()


# --------------------------------------------------------------------------- cleaning
def test_clean_text() -> None:
    assert clean_text("Café &amp; Naïve") == "café & naïve"
    assert clean_text("café &amp;amp; naïve") == "café & naïve"
    assert clean_text("  Multiple   spaces\n\tHere  ") == "multiple spaces here"
    assert clean_text("CafÃ©") == "café"  # ftfy repairs mojibake
    assert clean_text("bender \x97 and") == "bender — and"  # cp1252 dash read as latin-1
    assert clean_text("ZÜRICH") == "zürich"


# --------------------------------------------------------------------------- parity
def test_known_ids(tok: ClipTokenizer) -> None:
    """Ids that are independent of open_clip (well-known CLIP ids)."""
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("A  PHOTO of a CAT.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("hello world") == [3306, 1002]


def test_parity_pang_lee(tok: ClipTokenizer, reference, pang_lee: list[str]) -> None:
    assert len(pang_lee) == 200
    assert _mismatches(tok, reference, pang_lee) == []


def test_parity_lee_background(tok: ClipTokenizer, reference, lee_sentences: list[str]) -> None:
    assert len(lee_sentences) >= 2000
    assert _mismatches(tok, reference, lee_sentences) == []


def test_parity_hand_written(tok: ClipTokenizer, reference) -> None:
    assert _mismatches(tok, reference, HAND_WRITTEN) == []
    assert tok.encode("") == []
    assert tok.encode("Zürich") == reference.encode("zürich") and len(tok.encode("Zürich")) > 1


def test_special_token_difference_from_open_clip(tok: ClipTokenizer, reference) -> None:
    """The documented difference: only the special spellings are tokenized differently."""
    text = "what is it? <|spe|> <|endoftext|>"
    assert tok.encode(text)[-2:] == [SPE_ID, EOT_ID]
    assert reference.encode(text)[:4] == tok.encode(text)[:4]
    assert EOT_ID not in reference.encode(text)
    assert reference.encode("<start_of_text>") == [SOT_ID]
    assert tok.encode("<start_of_text>") != [SOT_ID]


# --------------------------------------------------------------------------- special tokens
@pytest.mark.parametrize(
    ("text", "expected"),
    [("<|spe|>", [SPE_ID]), ("<|endoftext|>", [EOT_ID]), ("<|startoftext|>", [SOT_ID]),
     ("<|gen|>", [GEN_ID]), ("<|SPE|>", [SPE_ID]), (" <|endoftext|> ", [EOT_ID])],
)
def test_special_tokens_single_ids(tok: ClipTokenizer, text: str, expected: list[int]) -> None:
    assert tok.encode(text) == expected


def test_specials_inside_text(tok: ClipTokenizer) -> None:
    assert tok.encode("cat<|endoftext|>") == tok.encode("cat") + [EOT_ID]
    assert tok.encode("a dog <|endoftext|>") == tok.encode("a dog") + [EOT_ID]
    assert tok.encode("is it red? <|spe|> <|endoftext|>") == tok.encode("is it red?") + [SPE_ID, EOT_ID]


def test_mask_text_is_not_a_special(tok: ClipTokenizer, reference) -> None:
    ids = tok.encode("<|mask|>")
    assert MASK_ID not in ids and len(ids) > 1
    assert ids == reference.encode("<|mask|>")
    assert tok.decode(ids) == "<| mask |>"


# --------------------------------------------------------------------------- encode_words
def test_encode_words_groups(tok: ClipTokenizer, pang_lee: list[str]) -> None:
    groups = tok.encode_words("Zürich's café <|spe|> unbelievably!!")
    assert [i for g in groups for i in g] == tok.encode("Zürich's café <|spe|> unbelievably!!")
    words = ["zürich", "'s", "café", "<|spe|>", "unbelievably", "!!"]
    assert len(groups) == len(words)
    for group, word in zip(groups, words):
        assert tok.encode(word) == group
    assert len(groups[0]) > 1 and groups[3] == [SPE_ID]
    for text in pang_lee[:50]:
        assert [i for g in tok.encode_words(text) for i in g] == tok.encode(text)
        assert all(g for g in tok.encode_words(text))


# --------------------------------------------------------------------------- decode
def test_decode_round_trip(tok: ClipTokenizer, reference, pang_lee: list[str],
                           lee_sentences: list[str]) -> None:
    assert tok.decode(tok.encode("A photo of a Cat")) == "a photo of a cat"
    assert tok.decode(tok.encode("Café Zürich 😀 naïve")) == "café zürich 😀 naïve"
    for text in pang_lee + lee_sentences[:300] + HAND_WRITTEN:
        ids = tok.encode(text)
        decoded = tok.decode(ids)
        assert decoded == " ".join(reference.decode(ids).split())
        assert decoded.replace(" ", "") == clean_text(text).replace(" ", "")


def test_decode_specials_and_padding(tok: ClipTokenizer) -> None:
    ids = tok.encode("is it red? <|spe|> <|endoftext|>")
    assert tok.decode(ids) == "is it red ?"
    assert tok.decode(ids, skip_special=False) == "is it red ? <|spe|> <|endoftext|>"
    assert tok.decode([MASK_ID, *tok.encode("cat")], skip_special=False) == "<|mask|> cat"
    assert tok.decode([PAD_ID]) == "!"  # id 0 is a real token: never dropped without a mask
    batch, mask = tok.encode_batch(["hi", "a much longer sentence than the first"], 16)
    assert batch[0, -1].item() == PAD_ID and not mask[0, -1]
    assert tok.decode(batch[0], mask=mask[0]) == "hi"
    assert tok.decode(batch[0]).startswith("hi") and tok.decode(batch[0]).endswith("!")
    assert tok.decode(batch[1], mask=mask[1]) == "a much longer sentence than the first"


# --------------------------------------------------------------------------- encode_batch
def test_encode_batch_padding(tok: ClipTokenizer) -> None:
    texts = ["a photo of a cat.", "dog", ""]
    ids, mask = tok.encode_batch(texts, 32)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    rows = [tok.encode(t) + [EOT_ID] for t in texts]
    assert ids.shape == mask.shape == (3, max(map(len, rows)))
    for b, row in enumerate(rows):
        assert ids[b, : len(row)].tolist() == row
        assert mask[b].sum().item() == len(row)
        assert mask[b, : len(row)].all() and not mask[b, len(row):].any()
        assert (ids[b, len(row):] == PAD_ID).all()
    ids, mask = tok.encode_batch(["a", "b"], 8, append_eot=False)
    assert ids.tolist() == [tok.encode("a"), tok.encode("b")] and mask.all()
    ids, mask = tok.encode_batch(["", ""], 8, append_eot=False)
    assert ids.shape == (2, 0)
    ids, mask = tok.encode_batch([], 8)
    assert ids.shape == (0, 0)


def test_encode_batch_truncation(tok: ClipTokenizer, lee_sentences: list[str]) -> None:
    long_texts = sorted(lee_sentences, key=len)[-5:]
    for max_length in (1, 2, 3, 7, 30):
        ids, mask = tok.encode_batch(long_texts, max_length)
        assert ids.shape[1] == max_length and mask.all()
        assert (ids[:, -1] == EOT_ID).all()
        for b, text in enumerate(long_texts):
            assert ids[b, :-1].tolist() == tok.encode(text)[: max_length - 1]
    ids, mask = tok.encode_batch(long_texts + ["short"], 6, suffix=[SPE_ID])
    assert ids.shape == (6, 6)
    assert ids[:5, -2:].tolist() == [[SPE_ID, EOT_ID]] * 5
    assert ids[5, : int(mask[5].sum())].tolist() == tok.encode("short") + [SPE_ID, EOT_ID]
    ids, _ = tok.encode_batch(long_texts, 2, suffix=[SPE_ID])
    assert ids.tolist() == [[SPE_ID, EOT_ID]] * 5
    ids, _ = tok.encode_batch(long_texts, 4, suffix=[SPE_ID], append_eot=False)
    assert (ids[:, -1] == SPE_ID).all() and ids.shape[1] == 4


# --------------------------------------------------------------------------- errors
def test_errors_are_clear(tok: ClipTokenizer, tmp_path: Path) -> None:
    assert issubclass(TokenizerError, UpctlError)
    with pytest.raises(TokenizerError, match="must be a str"):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([VOCAB_SIZE])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="integers"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="mask has 1 entries"):
        tok.decode([1, 2], mask=[True])
    with pytest.raises(TokenizerError, match="not in the CLIP BPE vocabulary"):
        tok.token_to_id("no-such-token")
    with pytest.raises(TokenizerError, match="cannot hold"):
        tok.encode_batch(["x"], 1, suffix=[SPE_ID])
    with pytest.raises(TokenizerError, match="max_length"):
        tok.encode_batch(["x"], 0)
    with pytest.raises(TokenizerError, match="one str"):
        tok.encode_batch("x", 5)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.encode_batch(["x"], 5, suffix=[VOCAB_SIZE])
    with pytest.raises(TokenizerError, match="integer ids"):
        tok.encode_batch(["x"], 5, suffix=[1.0])  # type: ignore[list-item]
    missing = tmp_path / "missing.txt.gz"
    with pytest.raises(TokenizerError, match="missing.txt.gz"):
        ClipTokenizer(missing)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(TokenizerError, match="short.txt.gz.*expected two BPE symbols|short.txt.gz.*merges"):
        ClipTokenizer(short)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(TokenizerError, match="bad.txt.gz: cannot read"):
        ClipTokenizer(bad)


# --------------------------------------------------------------------------- speed
def test_encode_is_fast(lee_sentences: list[str]) -> None:
    """A few hundred sentences, cold word cache, well under a second after load."""
    fresh = ClipTokenizer()
    texts = lee_sentences[:400]
    start = time.perf_counter()
    for text in texts:
        fresh.encode(text)
    fresh.encode_batch(texts, 77)
    assert time.perf_counter() - start < 1.0
