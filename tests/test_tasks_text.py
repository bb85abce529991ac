"""Text-side task families on real prepared data: MaskedLM (mini-news, bookswiki layout), GlueCloze
(mini-sentiment, official GLUE TSVs), VQA (the official VQAv2 layout with real photos).

The mini datasets are prepared once per session from the packages' own data (gensim, sklearn,
skimage); GLUE / VQAv2 / BooksWiki fixtures are written in their official layouts and prepared
by the real preparers.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.layouts import make_bookswiki, make_glue, make_vqav2
from uniperceiver.data.format import PreparedDataset, open_dataset, prepare_dataset
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.modeling import TextSegment, VisualSegment, build_model
from uniperceiver.tasks import build_task, task_config
from uniperceiver.tasks.base import encode_targets
from uniperceiver.tasks.glue import build_prompt
from uniperceiver.tasks.mlm import CorpusWindows, MaskedLM, whole_word_mask
from uniperceiver.tasks.vqa import VQA, sample_answer
from uniperceiver.tokenizers.text import EOT_ID, SPE_ID, get_tokenizer


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("mini-data")
    prepare_dataset("mini", None, data, options={"only": "news,sentiment,photos"})
    return data


@pytest.fixture(scope="session")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()  # eval: no random temporal offset, comparisons are exact


@pytest.fixture(scope="session")
def mlm_task(mini_dir, tiny) -> MaskedLM:
    return build_task(task_config("mini-news-mlm"), mini_dir, tiny.cfg)


# ---------------------------------------------------------------------------------------------- MLM


def test_mlm_windows_pack_lines_to_128_words(mlm_task, tok):
    ex = mlm_task.examples("train")
    n_lines = open_dataset("mini-news", mlm_task.dataset.root.parent).num_samples("train")
    assert len(ex) == n_lines  # one window starts at every line (all lines are non-empty)
    for e in ex[:200]:
        counts = [len(tok.encode_words(t)) + 1 for t in e["lines"]]
        assert sum(counts) >= 128  # the corpus is far longer than one window
        assert sum(counts[:-1]) < 128  # and the window is the shortest run that reaches it


def test_mlm_whole_word_masking_statistics(mlm_task):
    rng = np.random.default_rng(1234)
    words_total = masked_words = spe_words = kept_words = random_words = 0
    for e in mlm_task.examples("train")[:400]:
        words = mlm_task.tokens_of(e)
        ids, labels, word_index = whole_word_mask(words, rng)
        assert len(ids) == len(labels) == len(word_index) == sum(len(w) for w in words)
        by_word: dict[int, list[int]] = {}
        for pos, w in enumerate(word_index):
            by_word.setdefault(w, []).append(pos)
        for w, positions in by_word.items():
            lab = [labels[p] for p in positions]
            words_total += 1
            if lab[0] == -1:
                assert all(x == -1 for x in lab) and [ids[p] for p in positions] == words[w]
                continue
            masked_words += 1
            assert lab == words[w]  # every sub-token of a masked word carries its label
            got = [ids[p] for p in positions]
            if all(t == SPE_ID for t in got):
                spe_words += 1
            elif got == words[w]:
                kept_words += 1
            else:
                random_words += 1
    frac = masked_words / words_total
    assert words_total > 50_000
    assert abs(frac - 0.15) < 0.01, frac
    assert abs(spe_words / masked_words - 0.8) < 0.03
    assert abs(kept_words / masked_words - 0.1) < 0.03
    assert abs(random_words / masked_words - 0.1) < 0.03


def test_mlm_load_is_seeded_truncated_and_reads_label_positions(mlm_task):
    e = mlm_task.examples("train")[7]
    a = mlm_task.load(e, train=True, rng=np.random.default_rng(5))
    b = mlm_task.load(e, train=True, rng=np.random.default_rng(5))
    c = mlm_task.load(e, train=True, rng=np.random.default_rng(6))
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    assert len(a["ids"]) == 128  # packed past 128 sub-tokens, then truncated
    full = [t for w in mlm_task.tokens_of(e) for t in w]
    assert len(full) > 128
    assert int(a["ids"][-1]) == full[-1] or int(a["labels"][-1]) == full[-1]  # the reference keeps the last id
    # evaluation masking ignores the caller's rng: same tokens masked every time
    ev1 = mlm_task.load(e, train=False, rng=np.random.default_rng(1))
    ev2 = mlm_task.load(e, train=False, rng=np.random.default_rng(2))
    assert torch.equal(ev1["ids"], ev2["ids"]) and torch.equal(ev1["labels"], ev2["labels"])

    batch = mlm_task.collate([a, c], train=True, rng=np.random.default_rng(0))
    for i, item in enumerate((a, c)):
        pos = torch.nonzero(item["labels"].ge(0)).flatten()
        assert torch.equal(batch["read"][i, : len(pos)], pos + 1)  # fused position = 1 + text index
        assert int(batch["read_mask"][i].sum()) == len(pos)
        # targets index the corpus vocabulary subset and decode back to the original token ids
        labels = mlm_task.target_set().labels
        t = batch["targets"][i, : len(pos)]
        assert [int(labels[k]) for k in t.tolist()] == item["labels"][pos].tolist()


def test_mlm_corpus_vocabulary_and_full_vocabulary(mlm_task, mini_dir, tiny, tok):
    ts = mlm_task.target_set()
    ids = [int(x) for x in ts.labels]
    assert ids == sorted(ids) and EOT_ID in ids and 1000 < len(ids) < 20_000
    assert set(tok.encode("Hundreds of people have been forced")) <= set(ids)
    assert ts.ids[:, 1].eq(EOT_ID).all() and ts.ids[:, 0].tolist() == ids
    full = build_task(task_config("mini-news-mlm", vocab="full"), mini_dir, tiny.cfg)
    assert len(full.target_set()) == 49411
    with pytest.raises(ConfigError, match="vocab"):
        build_task(task_config("mini-news-mlm", vocab="words"), mini_dir, tiny.cfg)


@pytest.fixture(scope="module")
def book_dir(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bookswiki")
    expected = make_bookswiki(root / "raw")
    prepare_dataset("bookswiki", root / "raw", root / "data")
    return root / "data", expected


def _book_task(book_dir, model_cfg, **options) -> MaskedLM:
    opts = {"min_words": 12, "vocab": "corpus", "max_len": 32, **options}
    return build_task(task_config("bookswiki-mlm", options=opts), book_dir[0], model_cfg)


def test_mlm_loss_reaches_encoder_and_targets(book_dir):
    torch.manual_seed(0)
    model = build_model("tiny", depth=1)
    task = _book_task(book_dir, model.cfg, mask_prob=0.3)
    rng = np.random.default_rng(0)
    batch = task.collate([task.load(e, train=True, rng=rng) for e in task.examples("train")], train=True, rng=rng)
    ts = task.target_set()
    loss, stats = task.loss(model, batch, encode_targets(model, ts))
    assert torch.isfinite(loss) and stats["masked_tokens"] == int(batch["read_mask"].sum()) > 0
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.encoder.parameters()) > 0
    # an id that is a target but absent from the batch input gets gradient only through the targets
    absent = next(int(v) for v in ts.labels if int(v) not in set(batch["ids"].flatten().tolist()))
    assert model.embed.word.weight.grad[absent].abs().sum() > 0
    assert model.head.logit_scales["text_mlm"].grad is not None


def test_mlm_optimiser_steps_lower_the_loss(book_dir):
    torch.manual_seed(0)
    model = build_model("tiny", depth=1)
    model.embed.word.weight.requires_grad_(False)  # 9.5M of the 11M parameters: keeps the CPU test short
    task = _book_task(book_dir, model.cfg, mask_prob=0.3)
    rng = np.random.default_rng(0)
    batch = task.collate([task.load(e, train=True, rng=rng) for e in task.examples("train")], train=True, rng=rng)
    ts = task.target_set()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss, _ = task.loss(model, batch, encode_targets(model, ts))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_mlm_evaluation_metrics(mlm_task):
    tiny = build_model("tiny", depth=1).eval()  # one layer: the 7.5k-entry vocabulary is encoded on a CPU
    ts = mlm_task.target_set()
    with torch.no_grad():
        feats = encode_targets(tiny, ts)
    ex = mlm_task.examples("val")[:3]
    items = [mlm_task.load(e, train=False, rng=np.random.default_rng(0)) for e in ex]
    batch = mlm_task.collate(items, train=False, rng=np.random.default_rng(0))
    preds = mlm_task.evaluate_batch(tiny, batch, feats)
    assert [p["total"] for p in preds] == [int(it["labels"].ge(0).sum()) for it in items]
    m = mlm_task.compute_metrics(preds)
    assert 0.0 <= m["accuracy"] <= 100.0 and m["masked_tokens"] == sum(p["total"] for p in preds)
    assert mlm_task.compute_metrics([{"id": "a", "correct": 3, "total": 4}])["accuracy"] == 75.0


def test_mlm_streamed_corpus(book_dir, tiny, tok):
    lines = book_dir[1]["lines"]
    task = _book_task(book_dir, tiny.cfg, min_words=8)
    assert task.streaming("train")
    windows = list(task.iter_examples("train"))
    assert len(windows) == len(lines)
    assert sorted(w["lines"][0] for w in windows) == sorted(lines)
    for w in windows:
        counts = [len(tok.encode_words(t)) + 1 for t in w["lines"]]
        assert sum(counts) >= 8 and sum(counts[:-1]) < 8  # shortest run of lines reaching min_words
    lazy = task.examples("train")  # the trainer's path: windows read from disk through the line index
    assert isinstance(lazy, CorpusWindows) and list(lazy) == windows
    assert lazy[-1] == windows[-1] and lazy[1:3] == windows[1:3]
    with pytest.raises(IndexError, match="outside"):
        lazy[len(lazy)]
    resumed = list(task.iter_examples("train", start_line=2))
    assert [w["lines"][0] for w in resumed] == [w["lines"][0] for w in windows[2:]]
    assert set(tok.encode("Rain fell.")) <= {int(v) for v in task.target_set().labels}


# ---------------------------------------------------------------------------------------------- GLUE


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.token_to_id(t) for t in tokens]


def test_glue_sst2_prompt_layout_token_by_token(tok):
    ids, index = build_prompt(tok, "sst2", "A charming film")
    expect = _ids(tok, "a</w>", "charming</w>", "film</w>") + [EOT_ID] + _ids(tok, "it</w>", "is</w>") + [SPE_ID] \
        + _ids(tok, ".</w>") + [EOT_ID]
    assert ids == expect and index == 6 and ids[index] == SPE_ID
    cola, i = build_prompt(tok, "cola", "They drank the pub.")
    assert cola == tok.encode("They drank the pub.") + _ids(tok, "this</w>", "is</w>") + [SPE_ID] + _ids(tok, ".</w>") + [EOT_ID]
    assert cola[i] == SPE_ID
    long, j = build_prompt(tok, "sst2", "good " * 300, max_len=256)
    assert len(long) == 256 and long[j] == SPE_ID and long[-4:] == _ids(tok, "is</w>") + [SPE_ID] + _ids(tok, ".</w>") + [EOT_ID]


def test_glue_pair_prompts_layout(tok):
    ids, index = build_prompt(tok, "mrpc", "He left.", "She stayed.")
    expect = _ids(tok, "he</w>", "left</w>", ".</w>", ) + [SPE_ID] + _ids(tok, ",</w>", "she</w>", "stayed</w>", ".</w>") + [EOT_ID]
    assert ids == expect and index == 3
    rte, k = build_prompt(tok, "rte", "It rains.", "It is wet.")
    assert rte == _ids(tok, "it</w>", "rains</w>", "?</w>") + [EOT_ID] + _ids(tok, "it</w>", "is</w>") + [SPE_ID] \
        + _ids(tok, ",</w>", "it</w>", "is</w>", "wet</w>", ".</w>") + [EOT_ID]
    assert rte[k] == SPE_ID
    mnli, m = build_prompt(tok, "mnli", "It rains.", "It is wet.")
    assert mnli[:m] == tok.encode("It rains.")  # MNLI keeps the period, adds nothing
    assert mnli[m] == SPE_ID
    long, n = build_prompt(tok, "qqp", "why " * 400, "how " * 400, max_len=256)
    assert len(long) == 256 and long[n] == SPE_ID and long[-1] == EOT_ID
    with pytest.raises(DataError, match="text_b"):
        build_prompt(tok, "rte", "only one sentence")
    with pytest.raises(ConfigError, match="unknown"):
        build_prompt(tok, "squad", "x")


def test_glue_task_on_mini_sentiment(mini_dir, tiny, tok):
    task = build_task(task_config("mini-sentiment"), mini_dir, tiny.cfg)
    assert task.words == ["bad", "wonderful"] and task.target_set().labels == ["bad", "wonderful"]
    samples = task.examples("val")[:6]
    items = [task.load(s, train=False, rng=np.random.default_rng(0)) for s in samples]
    batch = task.collate(items, train=False, rng=np.random.default_rng(0))
    for i, (s, it) in enumerate(zip(samples, items)):
        ids, index = build_prompt(tok, "sst2", s["text"])
        assert batch["ids"][i, : len(ids)].tolist() == ids
        assert int(batch["read"][i]) == 1 + index and int(batch["ids"][i, index]) == SPE_ID
    # the read feature is exactly the head applied to the hidden state at the <|spe|> slot
    from uniperceiver.modeling.model import TextSegment
    with torch.no_grad():
        h, _ = tiny.hidden([TextSegment(batch["ids"], batch["valid"])])
        direct = tiny.head(h[torch.arange(len(items)), batch["read"]])
        read = tiny.encode([TextSegment(batch["ids"], batch["valid"])], read=batch["read"])
    assert torch.allclose(direct, read, atol=1e-6)
    feats = encode_targets(tiny, task.target_set())
    loss, stats = task.loss(tiny, batch, feats)
    assert torch.isfinite(loss) and 0.0 <= stats["accuracy"] <= 100.0
    preds = task.evaluate_batch(tiny, batch, feats.detach())
    m = task.compute_metrics(preds)
    assert m["num_samples"] == 6 and 0.0 <= m["accuracy"] <= 100.0
    expect = 100.0 * np.mean([p["pred"] == s["label"] for p, s in zip(preds, samples)])
    assert m["accuracy"] == pytest.approx(expect)


def test_glue_official_tsvs_mnli_and_stsb(tmp_path, tiny):
    make_glue(tmp_path / "raw")
    for name in ("glue-mnli", "glue-stsb"):
        prepare_dataset(name, tmp_path / "raw", tmp_path / "data")
    mnli = build_task(task_config("glue-mnli"), tmp_path / "data", tiny.cfg)
    assert mnli.words == ["no", "maybe", "yes"] and mnli.scale == "text_mlm"
    items = [mnli.load(s, train=True, rng=np.random.default_rng(0)) for s in mnli.examples("train")]
    batch = mnli.collate(items, train=True, rng=np.random.default_rng(0))
    assert batch["labels"].tolist() == [1, 2, 0]  # neutral, entailment, contradiction
    loss, _ = mnli.loss(tiny, batch, encode_targets(tiny, mnli.target_set()))
    assert torch.isfinite(loss)
    stsb = build_task(task_config("glue-stsb"), tmp_path / "data", tiny.cfg)
    items = [stsb.load(s, train=True, rng=np.random.default_rng(0)) for s in stsb.examples("train")]
    batch = stsb.collate(items, train=True, rng=np.random.default_rng(0))
    assert batch["labels"].tolist() == pytest.approx([5.0, 3.8])
    feats = encode_targets(tiny, stsb.target_set())
    loss, _ = stsb.loss(tiny, batch, feats)
    assert torch.isfinite(loss)
    preds = stsb.evaluate_batch(tiny, batch, feats.detach())
    assert all(0.0 <= p["pred"] <= 5.0 for p in preds)
    assert set(stsb.compute_metrics(preds)) >= {"pearson", "spearman"}


# ---------------------------------------------------------------------------------------------- VQA


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    make_vqav2(root / "raw")
    prepare_dataset("vqav2", root / "raw", root / "data", options={"min_count": "1"})
    return root / "data"


def test_vqa_layout_and_read_position(vqa_dir, tiny, tok):
    task = build_task(task_config("vqav2"), vqa_dir, tiny.cfg)
    assert task.target_set().labels == ["yes", "2", "1", "red"]
    assert task.target_set().ids[0].tolist()[:2] == [tok.token_to_id("yes</w>"), EOT_ID]
    samples = task.examples("val")
    items = [task.load(s, train=False, rng=np.random.default_rng(0)) for s in samples]
    batch = task.collate(items, train=False, rng=np.random.default_rng(0))
    n_visual = (tiny.cfg.image_size // tiny.cfg.patch_size) ** 2
    for i, s in enumerate(samples):
        q = tok.encode(s["question"])[:21] + [SPE_ID, EOT_ID]
        assert batch["ids"][i, : len(q)].tolist() == q
        assert int(batch["read"][i]) == 1 + n_visual + len(q) - 2
    long_q, idx = task.question_ids("what " * 40)
    assert len(long_q) == 23 and long_q[idx] == SPE_ID and long_q[-1] == EOT_ID
    from uniperceiver.modeling.model import TextSegment, VisualSegment
    segs = [VisualSegment(batch["pixels"]), TextSegment(batch["ids"], batch["valid"])]
    with torch.no_grad():
        h, _ = tiny.hidden(segs)
        spe_pos = [1 + n_visual + batch["ids"][i].tolist().index(SPE_ID) for i in range(len(items))]
        direct = tiny.head(h[torch.arange(len(items)), torch.tensor(spe_pos)])
        assert torch.allclose(tiny.encode(segs, read=batch["read"]), direct, atol=1e-6)
        feats = encode_targets(tiny, task.target_set())
    preds = task.evaluate_batch(tiny, batch, feats)
    m = task.compute_metrics(preds)
    from uniperceiver.metrics.vqa import vqa_score
    ref = vqa_score({p["question_id"]: p["answer"] for p in preds}, {s["question_id"]: s["answers"] for s in samples})
    assert m["accuracy"] == ref["overall"] and m["num_questions"] == 2
    assert "accuracy_yes/no" in m


def test_vqa_soft_score_sampling_frequencies(vqa_dir, tiny):
    task = build_task(task_config("vqav2"), vqa_dir, tiny.cfg)
    scores = {"yes": 0.3, "2": 0.9, "red": 0.6, "orange": 1.0}  # "orange" is not in the answer list
    rng = np.random.default_rng(7)
    draws = Counter(sample_answer(scores, task.answer_index, rng) for _ in range(6000))
    idx = task.answer_index
    assert set(draws) == {idx["yes"], idx["2"], idx["red"]}
    for ans, p in (("yes", 1 / 6), ("2", 1 / 2), ("red", 1 / 3)):
        assert abs(draws[idx[ans]] / 6000 - p) < 0.025, (ans, draws)
    assert sample_answer({"orange": 1.0}, idx, rng) == -100
    # through load(): the same frequencies on a real sample with a real image
    sample = dict(task.examples("train")[0], answer_scores={"yes": 0.3, "2": 0.9})
    got = Counter(task.load(sample, train=True, rng=np.random.default_rng(k))["target"] for k in range(300))
    assert abs(got[idx["2"]] / 300 - 0.75) < 0.08
    a = task.load(sample, train=True, rng=np.random.default_rng(3))
    b = task.load(sample, train=True, rng=np.random.default_rng(3))
    assert a["target"] == b["target"] and torch.equal(a["pixels"], b["pixels"])


def test_vqa_flip_swaps_left_and_right(vqa_dir, tiny, tok):
    ds = open_dataset("vqav2", vqa_dir)
    meta = copy.deepcopy(ds.meta)
    meta["targets"]["answers"] = meta["targets"]["answers"] + ["left", "right"]
    task = VQA(task_config("vqav2"), PreparedDataset(ds.name, ds.root, meta), tok, tiny.cfg)
    sample = dict(task.examples("train")[0], question="Is the cup on the left or the right?",
                  answer_scores={"left": 1.0})
    plain = tok.encode(sample["question"]) + [SPE_ID, EOT_ID]
    swapped = [tok.token_to_id("right</w>") if t == tok.token_to_id("left</w>") else
               tok.token_to_id("left</w>") if t == tok.token_to_id("right</w>") else t for t in plain]
    assert swapped != plain
    seen = set()
    for k in range(40):
        it = task.load(sample, train=True, rng=np.random.default_rng(k))
        seen.add(it["flipped"])
        assert it["ids"].tolist() == (swapped if it["flipped"] else plain)
        assert task.answers[it["target"]] == ("right" if it["flipped"] else "left")
    assert seen == {True, False}
    # the flip really mirrors the image: same crop, flipped or not, differ by a horizontal mirror
    from uniperceiver.data.media import load_image
    from uniperceiver.tokenizers.vision import image_eval_transform
    img = load_image(task.dataset.media_path(sample))
    ev = task.load(sample, train=False, rng=np.random.default_rng(0))
    assert torch.allclose(ev["pixels"], image_eval_transform(img, tiny.cfg.image_size))
    assert ev["ids"].tolist() == plain and ev["target"] == -100


def test_vqa_training_loss_reaches_encoder_and_answers(vqa_dir):
    model = build_model("tiny", depth=1)
    task = build_task(task_config("vqav2"), vqa_dir, model.cfg)
    rng = np.random.default_rng(0)
    items = [task.load(s, train=True, rng=rng) for s in task.examples("train")]
    batch = task.collate(items, train=True, rng=rng)
    feats = encode_targets(model, task.target_set())
    loss, stats = task.loss(model, batch, feats)
    assert torch.isfinite(loss) and stats["answered"] == len(items)
    loss.backward()
    assert model.head.logit_scales["downstream"].grad is not None
    assert model.embed.patch.weight.grad.abs().sum() > 0
    red = task.target_set().ids[task.answer_index["red"], 0]
    assert model.embed.word.weight.grad[red].abs().sum() > 0


def test_vqa_fixed_temperature_replaces_the_learnable_scale(vqa_dir):
    """recipes/finetune/vqav2.yaml's `fixed_temperature: 0.03`: logits = cosine / 0.03 and the
    `downstream` scale gets no gradient."""
    model = build_model("tiny", depth=1).eval()  # eval: no random temporal offset between the two encodes
    cfg = task_config("vqav2")
    cfg.options = {**cfg.options, "fixed_temperature": 0.03}
    task = build_task(cfg, vqa_dir, model.cfg)
    rng = np.random.default_rng(0)
    batch = task.collate([task.load(s, train=True, rng=rng) for s in task.examples("train")], train=True, rng=rng)
    feats = encode_targets(model, task.target_set())
    logits = task._logits(model, batch, feats)
    cos = model.encode([VisualSegment(batch["pixels"]), TextSegment(batch["ids"], batch["valid"])], read=batch["read"]) @ feats.t()
    torch.testing.assert_close(logits, cos / 0.03)
    loss, _ = task.loss(model, batch, feats)
    loss.backward()
    assert model.head.logit_scales["downstream"].grad is None
    bad = task_config("vqav2")
    bad.options = {**bad.options, "fixed_temperature": 0}
    with pytest.raises(ConfigError, match="fixed_temperature"):
        build_task(bad, vqa_dir, model.cfg)
