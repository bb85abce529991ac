"""The unified model: masks, KV cache, padding invariance, SDPA vs plain math, sizes, prompts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uniperceiver.errors import ConfigError, UpctlError
from uniperceiver.modeling.model_config import model_config
from uniperceiver.modeling.embeddings import sincos_2d
from uniperceiver.modeling.masks import caption_mask
from uniperceiver.modeling.model import TextSegment, UniPerceiver, VisualSegment, build_model

SPE = 49410


def _digits_images(n: int, size: int = 64) -> torch.Tensor:
    """Real images: sklearn's handwritten digits, upscaled and normalised."""
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0  # [n, 8, 8]
    imgs = F.interpolate(imgs[:, None], size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
    return (imgs - 0.5) / 0.25


def _model(**kw) -> UniPerceiver:
    torch.manual_seed(0)
    m = build_model("tiny", **kw).eval()
    # Layer scale 1e-3 makes the blocks nearly the identity at init; scale up so tests are sensitive.
    with torch.no_grad():
        for b in m.encoder.blocks:
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
    return m


def test_reference_sizes_parameter_counts() -> None:
    for size, target in (("base", 124e6), ("large", 354e6)):
        n = sum(p.numel() for p in build_model(size).parameters())
        assert abs(n - target) / target < 0.01, (size, n)


def test_unknown_size_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="tiny, small, base, large"):
        model_config("huge")


def test_sincos_row_first_and_scaled() -> None:
    d, s = 16, 160 / 224
    table = sincos_2d(3, 4, d, s)
    w = 1.0 / (10000.0 ** (torch.arange(4, dtype=torch.float64) / 4))
    r, c = 2, 3
    expect = torch.cat([torch.sin(r * s * w), torch.cos(r * s * w), torch.sin(c * s * w), torch.cos(c * s * w)])
    assert torch.allclose(table[r * 4 + c].double(), expect, atol=1e-6)


def test_features_are_normalised_and_mixed_modalities_work() -> None:
    m = _model()
    img = _digits_images(2)
    ids = torch.tensor([[320, 1125, 49407], [320, 2368, 49407]])
    video = img[:, None].repeat(1, 4, 1, 1, 1)
    for segs in ([VisualSegment(img)], [TextSegment(ids)], [VisualSegment(video), TextSegment(ids)]):
        f = m.encode(segs)
        assert f.shape == (2, 192)
        assert torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_padding_does_not_change_features() -> None:
    m = _model()
    img = _digits_images(1)
    short = torch.tensor([[320, 1125, 49407]])
    alone = m.encode([VisualSegment(img), TextSegment(short)])
    padded = torch.tensor([[320, 1125, 49407, 0, 0, 0], [320, 2368, 533, 1237, 999, 49407]])
    valid = padded != 0
    valid[1] = True
    both = m.encode([VisualSegment(img.repeat(2, 1, 1, 1)), TextSegment(padded, valid)])
    assert torch.allclose(alone[0], both[0], atol=1e-5)


def test_sdpa_equals_plain_attention_math() -> None:
    m = _model()
    x = torch.randn(2, 9, 192)
    mask = torch.rand(2, 9, 9) > 0.3
    mask[:, :, 0] = True
    attn = m.encoder.blocks[0].attn
    out, _, _ = attn(x, mask)
    q, k, v = attn.qkv(x).chunk(3, -1)
    split = lambda t: t.view(2, 9, 3, 64).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(64)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 192)
    assert torch.allclose(out, attn.out(ref), atol=1e-5)


def _caption_hidden(m: UniPerceiver, img: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    t = words.shape[1]
    queries = torch.full_like(words, SPE)
    text = torch.cat([words, queries], 1)
    pos = torch.cat([torch.arange(t), torch.arange(t)])
    context = 1 + VisualSegment(img).num_tokens(m.cfg.patch_size)
    mask = caption_mask(context, t)
    h, _ = m.hidden([VisualSegment(img), TextSegment(text, positions=pos)], attn_mask=mask)
    return h, context


def test_caption_mask_semantics() -> None:
    m = _model()
    img = _digits_images(1)
    words = torch.tensor([[320, 1125, 2368, 533, 49407]])
    h, ctx = _caption_hidden(m, img, words)
    t = words.shape[1]
    for j in range(t):
        changed = words.clone()
        changed[0, j] = 9999
        h2, _ = _caption_hidden(m, img, changed)
        queries, queries2 = h[0, ctx + t:], h2[0, ctx + t:]
        # Query i sees words < i: changing word j leaves queries 0..j unchanged, changes some later one.
        assert torch.allclose(queries[: j + 1], queries2[: j + 1], atol=1e-5)
        if j < t - 1:
            assert not torch.allclose(queries[j + 1:], queries2[j + 1:], atol=1e-4)
        # Image tokens and the prefix never see text.
        assert torch.allclose(h[0, :ctx], h2[0, :ctx], atol=1e-6)


def test_kv_cached_decoding_equals_full_recomputation() -> None:
    m = _model()
    img = _digits_images(2)
    words = torch.tensor([[320, 1125, 2368, 533, 49407], [320, 9999, 12, 77, 49407]])
    full, ctx = _caption_hidden(m, img, words)
    t = words.shape[1]
    cache = m.prefill([VisualSegment(img)])
    steps = []
    h, _ = m.extend(cache, torch.full((2, 1), SPE), torch.tensor([0]))
    steps.append(h[:, 0])
    for i in range(1, t):
        ids = torch.stack([words[:, i - 1], torch.full((2,), SPE)], 1)
        mask = torch.ones(1, 2, cache.length + 2, dtype=torch.bool)
        mask[0, 0, -1] = False  # the word does not see the query
        h, cache = m.extend(cache, ids, torch.tensor([i - 1, i]), attn_mask=mask, append=1)
        steps.append(h[:, 1])
    inc = torch.stack(steps, 1)
    assert torch.allclose(inc, full[:, ctx + t:], atol=1e-5)
    # The cache can be reordered (beam search) consistently.
    swapped = cache.reorder(torch.tensor([1, 0]))
    assert torch.equal(swapped.keys[0][0], cache.keys[0][1])


def test_deep_prompts_touch_keys_and_values_only() -> None:
    m = _model(prompt_tokens=10)
    img = _digits_images(2)
    h, valid = m.hidden([VisualSegment(img)])
    assert h.shape[1] == valid.shape[1] == 1 + 16  # prompts add no output rows
    before = m.encode([VisualSegment(img)])
    with torch.no_grad():
        for b in m.encoder.blocks:
            b.prompt.add_(torch.randn_like(b.prompt))  # a constant shift would vanish in LN1
    assert not torch.allclose(before, m.encode([VisualSegment(img)]), atol=1e-4)


def test_spe_bias_and_cls_head() -> None:
    m = _model(spe_bias=True, cls_head_classes=10)
    img = _digits_images(2)
    f = m.encode([VisualSegment(img)])
    logits = torch.randn(2, 10)
    assert torch.equal(m.prompt_logits(logits, f), logits)  # zero-initialised head, weight 1
    with torch.no_grad():
        m.embed.spe_bias.fill_(0.5)
    assert not torch.allclose(f, m.encode([VisualSegment(img)]))


def test_logit_scale_is_clamped_and_named() -> None:
    m = _model()
    assert torch.isclose(m.logit_scale("img_cls"), torch.tensor(1 / 0.07), rtol=1e-5)
    with torch.no_grad():
        m.head.logit_scales["caption"].fill_(10.0)
    assert m.logit_scale("caption").item() == 100.0
    with pytest.raises(ConfigError, match="unknown logit scale"):
        m.logit_scale("nope")


def test_temporal_offset_random_in_training_and_zero_in_eval() -> None:
    m = _model()
    clip = _digits_images(1)[:, None].repeat(1, 2, 1, 1, 1)
    a = m.encode([VisualSegment(clip)])
    assert torch.equal(a, m.encode([VisualSegment(clip)]))
    m.train()
    torch.manual_seed(1)
    outs = {tuple(m.encode([VisualSegment(clip)]).detach().flatten()[:4].tolist()) for _ in range(12)}
    assert len(outs) > 1


def test_bad_inputs_get_clear_errors() -> None:
    m = _model()
    with pytest.raises(UpctlError, match="temporal table of 8 frames"):
        m.encode([VisualSegment(torch.zeros(1, 9, 3, 64, 64))])
    with pytest.raises(UpctlError, match=r"\[batch, frames, 3, height, width\]"):
        m.encode([VisualSegment(torch.zeros(1, 1, 64, 64))])
    with pytest.raises(UpctlError, match="float tensor"):
        m.encode([VisualSegment(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))])
    with pytest.raises(UpctlError, match="multiple of the patch size"):
        m.encode([VisualSegment(torch.zeros(1, 3, 60, 64))])
    with pytest.raises(UpctlError, match="exceeds the 512 learned positions"):
        m.encode([TextSegment(torch.zeros(1, 600, dtype=torch.long))])


def test_activation_checkpointing_gives_same_gradients() -> None:
    img = _digits_images(2)
    grads = []
    for ckpt in (False, True):
        m = _model(grad_checkpointing=ckpt).train()
        f = m.encode([VisualSegment(img)], temporal_offset=0)
        f.sum().backward()
        grads.append(m.embed.patch.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _saved_activation_bytes(model: UniPerceiver, segments) -> int:
    """Bytes autograd keeps for backward outside checkpointed regions (what checkpointing frees)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encode(segments, temporal_offset=0).sum()
    return total


def test_activation_checkpointing_keeps_only_block_inputs() -> None:
    """With checkpointing no block keeps its internal activations: what stays saved for backward is
    a small fraction of the plain forward's (the rest is recomputed block by block)."""
    ids = torch.randint(1, 1000, (4, 40))
    img = _digits_images(4)
    sizes = {}
    for ckpt in (False, True):
        m = _model(grad_checkpointing=ckpt).train()
        sizes[ckpt] = _saved_activation_bytes(m, [VisualSegment(img), TextSegment(ids)])
    assert sizes[True] < 0.2 * sizes[False], sizes


def test_one_word_table_lookup_per_sequence() -> None:
    """The SPE prefix and every text segment share one embedding lookup (one dense gradient for the
    49,411-row table in backward), and the result equals embedding each part on its own."""
    m = _model().train()
    a, b = torch.randint(1, 1000, (3, 7)), torch.randint(1, 1000, (3, 5))
    img = _digits_images(3)
    x, valid = m.embed_segments([TextSegment(a), VisualSegment(img), TextSegment(b)], temporal_offset=0)
    e = m.embed
    spe = e.norm(e.word(torch.full((3, 1), SPE)))
    expected = torch.cat([spe, e.text(a), e.visual(img, 0), e.text(b)], dim=1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert valid.shape == x.shape[:2] and bool(valid.all())

    lookups, seen, stack = 0, set(), [x.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        lookups += node.name() == "EmbeddingBackward0" and any(
            getattr(n, "variable", None) is e.word.weight for n, _ in node.next_functions if n is not None
        )
        stack += [n for n, _ in node.next_functions]
    assert lookups == 1


def test_layerscale_folded_into_the_last_linears_equals_scaling_the_branch() -> None:
    """gamma * linear(x), computed either way (scaled activations, or gamma folded into the weight and
    bias for large batches): the output and the gradients of the input, gammas and weights agree."""
    from uniperceiver.modeling.encoder import Block

    torch.manual_seed(0)
    cfg = model_config("tiny")
    block = Block(cfg, drop_path=0.0)
    with torch.no_grad():
        block.gamma_1.uniform_(0.5, 1.5)
        block.gamma_2.uniform_(-1.0, 1.0)
    # 2 x 5 tokens: gamma scales the activations; 4 x 300 tokens: gamma is folded into the weights
    # (tokens >= 1.5 x the linear's input width, for both linears of tiny).
    for shape in ((2, 5), (4, 300)):
        x = torch.randn(*shape, cfg.width, requires_grad=True)
        params = [x, block.gamma_1, block.gamma_2, block.fc2.weight, block.fc2.bias, block.attn.out.weight]
        out, _, _ = block(x, None)
        got = torch.autograd.grad(out.pow(2).sum(), params)

        a, _, _ = block.attn(block.norm1(x), None)  # the unscaled branch
        y = x + block.gamma_1 * a
        ref = y + block.gamma_2 * block.fc2(F.gelu(block.fc1(block.norm2(y))))
        want = torch.autograd.grad(ref.pow(2).sum(), params)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_padded_cache_keys_stay_masked_without_an_attention_mask() -> None:
    """A cache built from a padded sequence: new tokens attend to its valid keys only, even when the
    caller passes no attention mask (the no-mask fast path must not skip the cache's padding)."""
    torch.manual_seed(0)
    enc = build_model("tiny").eval().encoder
    with torch.no_grad():
        for b in enc.blocks:
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
        width = enc.cfg.width
        x, new = torch.randn(1, 4, width), torch.randn(1, 2, width)
        _, padded_cache = enc(x, torch.tensor([[True, True, False, False]]), build_cache=True)
        _, short_cache = enc(x[:, :2], torch.ones(1, 2, dtype=torch.bool), build_cache=True)
        got, _ = enc(new, torch.ones(1, 2, dtype=torch.bool), cache=padded_cache)
        want, _ = enc(new, torch.ones(1, 2, dtype=torch.bool), cache=short_cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
