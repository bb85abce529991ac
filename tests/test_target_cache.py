"""TargetCache: encoded targets computed once per (checkpoint, target list), in memory and on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniperceiver.evaluation.target_cache import TargetCache, default_cache_dir, model_key_for
from uniperceiver.modeling import build_model, save_model
from uniperceiver.modeling.model_dir import state_digest, weights_digest
from uniperceiver.tasks.base import encode_targets, text_target_set, vocab_target_set
from uniperceiver.tokenizers.text import get_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def classes():
    return text_target_set("digits", ["zero", "one", "two", "three", "a handwritten seven"], get_tokenizer())


class Counting:
    """Wraps the real encoder call to count how often the cache lets it run."""

    def __init__(self, model, targets) -> None:
        self.model, self.targets, self.calls = model, targets, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return encode_targets(self.model, self.targets)


def test_memory_then_disk_hits(tmp_path: Path, model, classes) -> None:
    key = state_digest(model)
    cache = TargetCache(tmp_path)
    compute = Counting(model, classes)
    first = cache.get(key, classes, compute)
    assert (cache.misses, cache.hits, cache.disk_hits, compute.calls) == (1, 0, 0, 1)
    assert first.shape == (5, model.cfg.width) and not first.requires_grad
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(5))
    again = cache.get(key, classes, compute)
    assert (cache.misses, cache.hits, compute.calls) == (1, 1, 1)
    assert torch.equal(again, first)

    path = tmp_path / key / f"{classes.key}.safetensors"
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    fresh = TargetCache(tmp_path)
    from_disk = fresh.get(key, classes, compute)
    assert (fresh.misses, fresh.hits, fresh.disk_hits, compute.calls) == (0, 1, 1, 1)
    torch.testing.assert_close(from_disk, first)


def test_keys_separate_models_and_target_lists(tmp_path: Path, model, classes) -> None:
    cache = TargetCache(tmp_path)
    cache.get("model-a", classes, Counting(model, classes))
    other = text_target_set("digits", ["zero", "one", "two", "three", "four"], get_tokenizer())
    assert other.key != classes.key
    cache.get("model-a", other, Counting(model, other))
    cache.get("model-b", classes, Counting(model, classes))
    assert cache.misses == 3 and cache.hits == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-a", "model-b"]


def test_corrupt_file_is_recomputed(tmp_path: Path, model, classes) -> None:
    cache = TargetCache(tmp_path)
    good = cache.get("m", classes, Counting(model, classes))
    path = cache.path("m", classes)
    path.write_bytes(b"not a safetensors file")
    fresh = TargetCache(tmp_path)
    compute = Counting(model, classes)
    again = fresh.get("m", classes, compute)
    assert compute.calls == 1 and fresh.misses == 1 and fresh.disk_hits == 0
    torch.testing.assert_close(again, good)
    assert TargetCache(tmp_path)._read_disk("m", classes) is not None  # rewritten


def test_memory_only_and_default_dir(tmp_path: Path, monkeypatch, model, classes) -> None:
    cache = TargetCache(None)
    compute = Counting(model, classes)
    cache.get("m", classes, compute)
    cache.get("m", classes, compute)
    assert compute.calls == 1 and cache.hits == 1 and cache.path("m", classes) is None
    monkeypatch.setenv("UPCTL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UPCTL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "upctl" / "targets"


def test_unsafe_keys_and_bad_shapes_are_refused(tmp_path: Path, model, classes) -> None:
    from uniperceiver.errors import UpctlError

    cache = TargetCache(tmp_path)
    with pytest.raises(UpctlError, match="not a safe file name"):
        cache.get("../escape", classes, Counting(model, classes))
    with pytest.raises(UpctlError, match=r"expected \[5, D\]"):
        cache.get("m", classes, lambda: torch.zeros(3, 4))


def test_model_key_is_the_checkpoint_digest(tmp_path: Path, model) -> None:
    out = save_model(model, tmp_path / "ckpt")
    assert model_key_for(model, out) == weights_digest(out)
    assert model_key_for(model) == state_digest(model)
    other = build_model("tiny")
    assert model_key_for(other) != model_key_for(model)


def test_full_vocabulary_encoded_once_per_checkpoint(tmp_path: Path) -> None:
    """The 49,411-entry word classifier: one encoding, then reused from memory and from disk.
    (A one-layer tiny model keeps the single full encoding affordable on a CPU.)"""
    torch.manual_seed(1)
    model = build_model("tiny", depth=1).eval()
    vocab = vocab_target_set()
    key = state_digest(model)
    compute = Counting(model, vocab)
    cache = TargetCache(tmp_path)
    feats = cache.get(key, vocab, compute)
    assert feats.shape == (49411, model.cfg.width)
    # spot-check rows against a direct encoding of [SPE, v, EOT]
    rows = torch.tensor([0, 1234, 49407, 49410])
    with torch.no_grad():
        direct = model.encode_text(vocab.ids[rows], vocab.valid[rows])
    torch.testing.assert_close(feats[rows], direct, atol=1e-5, rtol=1e-4)
    assert cache.get(key, vocab, compute) is feats
    fresh = TargetCache(tmp_path)
    torch.testing.assert_close(fresh.get(key, vocab, compute), feats)
    assert compute.calls == 1 and fresh.disk_hits == 1
