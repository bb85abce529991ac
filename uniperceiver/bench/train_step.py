"""Training-step benchmarks: ours against Hugging Face BertModel (text) and timm ViT (images).

Every case does the same work: forward, a mean-square loss over the final hidden states, backward
and one AdamW step, on the same batch shapes and with the same width and depth. Run one case per
process (see `worker.py`) so that the peak memory of a case is its own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from uniperceiver.bench.flops import train_step_flops
from uniperceiver.bench.timing import Timing, current_rss_bytes, peak_rss_bytes, reset_peak_rss, time_fn
from uniperceiver.modeling.model_config import model_config
from uniperceiver.modeling.masks import caption_mask
from uniperceiver.modeling.model import TextSegment, UniPerceiver, VisualSegment


@dataclass
class StepCase:
    impl: str  # "ours" | "bert" | "timm-vit"
    size: str
    kind: str  # "text" | "image" | "video" | "caption" | "retrieval" (image-text pairs, contrastive)
    batch: int
    text_len: int = 0
    frames: int = 0
    image_size: int = 224
    checkpointing: bool = False
    precision: str = "fp32"
    measure_memory: bool = False  # also measure one forward + backward's memory (an extra pass)
    compile: bool = False  # torch.compile: our encoder (as train.compile does), the baselines whole


@dataclass
class StepResult:
    case: dict
    median_s: float
    samples_per_s: float
    tokens_per_s: float
    flops_per_step: int
    achieved_flops: float
    peak_mem_bytes: int
    step_mem_bytes: int
    fwd_bwd_mem_bytes: int = 0  # rise of memory over one forward + backward (activations + gradients)
    fwd_bwd_peak_bytes: int = 0  # the whole process's peak during that pass (weights, optimizer state...)
    fwd_bwd_s: float = 0.0  # that pass's time (one sample)


def _ours(case: StepCase, device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], int]:
    cfg = model_config(case.size, image_size=case.image_size, grad_checkpointing=case.checkpointing)
    model = UniPerceiver(cfg).to(device).train()
    b = case.batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49000, (b, case.text_len), generator=g).to(device) if case.text_len else None
    frames = case.frames
    pixels = None
    if frames:
        shape = (b, frames, 3, case.image_size, case.image_size)
        pixels = torch.randn(shape, generator=g).to(device)
    mask = None
    segments = []
    if pixels is not None:
        segments.append(VisualSegment(pixels))
    if case.kind == "caption":
        t = case.text_len
        words = ids
        queries = torch.full_like(words, 49410)
        pos = torch.cat([torch.arange(t), torch.arange(t)]).to(device)
        segments.append(TextSegment(torch.cat([words, queries], 1), positions=pos))
        context = 1 + frames * cfg.grid_size**2
        mask = caption_mask(context, t, device)
    elif ids is not None:
        segments.append(TextSegment(ids))

    if case.kind == "retrieval":
        # Image-text pairs as in pre-training: images and captions encoded separately by the same
        # encoder, symmetric cross-entropy over the in-batch similarities (pairs/s is the figure).
        images, texts = [VisualSegment(pixels)], [TextSegment(ids)]
        labels = torch.arange(b, device=device)

        def pair_loss() -> torch.Tensor:
            img = model.encode(images, temporal_offset=0)
            txt = model.encode(texts)
            logits = model.logits(img, txt, "retrieve")
            return torch.nn.functional.cross_entropy(logits.float(), labels) + torch.nn.functional.cross_entropy(
                logits.float().t(), labels)

        return model, pair_loss, (1 + frames * cfg.grid_size**2) + (1 + case.text_len)

    def loss() -> torch.Tensor:
        h, _ = model.hidden(segments, attn_mask=mask, temporal_offset=0)
        return h.float().pow(2).mean()

    seq = 1 + (2 * case.text_len if case.kind == "caption" else case.text_len) + frames * cfg.grid_size**2
    return model, loss, seq


def _bert(case: StepCase, device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], int]:
    from transformers import BertConfig, BertModel

    cfg = model_config(case.size)
    bc = BertConfig(
        vocab_size=49411,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    try:
        model = BertModel(bc, add_pooling_layer=False, attn_implementation="sdpa")
    except TypeError:
        model = BertModel(bc, add_pooling_layer=False)
    model = model.to(device).train()
    if case.checkpointing:
        model.gradient_checkpointing_enable()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49000, (case.batch, case.text_len + 1), generator=g).to(device)

    def loss() -> torch.Tensor:
        return model(input_ids=ids).last_hidden_state.float().pow(2).mean()

    return model, loss, case.text_len + 1


def _vit(case: StepCase, device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], int]:
    from timm.models.vision_transformer import VisionTransformer

    cfg = model_config(case.size)
    model = VisionTransformer(
        img_size=case.image_size,
        patch_size=16,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        num_classes=0,
    ).to(device).train()
    if case.checkpointing:
        model.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=g).to(device)

    def loss() -> torch.Tensor:
        return model.forward_features(pixels).float().pow(2).mean()

    return model, loss, 1 + (case.image_size // 16) ** 2


BUILDERS = {"ours": _ours, "bert": _bert, "timm-vit": _vit}


def run_step_case(case: StepCase, device: torch.device, warmup: int = 1, repeats: int = 3) -> StepResult:
    model, loss_fn, seq = BUILDERS[case.impl](case, device)
    if case.compile:
        if isinstance(model, UniPerceiver):
            model.encoder.compile()
        elif case.impl == "timm-vit":  # the step calls forward_features, which Module.compile() skips
            model.forward_features = torch.compile(model.forward_features)
        else:
            model.compile()
    # The same optimizer for every implementation (the fused kernel our trainer uses), so the ratio
    # compares the models.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16")

    def step() -> None:
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Allocate the optimizer state first (a step on zero gradients, no forward pass) so that the
    # peak measured next is the step's own activations and gradients on top of a known base.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    fwd_bwd = _fwd_bwd_memory(loss_fn, autocast, device) if case.measure_memory else (0, 0, 0.0)
    opt.zero_grad(set_to_none=True)
    before = current_rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    if repeats > 0:
        timing = time_fn(step, warmup=warmup, repeats=repeats, device=device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    elif case.measure_memory:  # memory only: the one forward + backward pass stands for the step's time
        timing, peak, before = Timing(fwd_bwd[2], fwd_bwd[2], 0), fwd_bwd[1], fwd_bwd[1] - fwd_bwd[0]
    else:
        raise ValueError("repeats=0 needs measure_memory (there would be nothing to report)")
    cfg = model_config(case.size, image_size=case.image_size)
    text = 2 * case.text_len if case.kind == "caption" else case.text_len
    if case.impl == "ours" and case.kind == "retrieval":  # two sequences per pair
        flops = train_step_flops(cfg, case.batch, frames=case.frames) + train_step_flops(cfg, case.batch, text_len=case.text_len)
    elif case.impl == "ours":
        flops = train_step_flops(cfg, case.batch, text_len=text, frames=case.frames)
    elif case.impl == "bert":
        flops = train_step_flops(cfg, case.batch, text_len=case.text_len)
    else:
        flops = train_step_flops(cfg, case.batch, frames=1)
    return StepResult(
        case=asdict(case),
        median_s=timing.median_s,
        samples_per_s=case.batch / timing.median_s,
        tokens_per_s=case.batch * seq / timing.median_s,
        flops_per_step=flops,
        achieved_flops=flops / timing.median_s,
        peak_mem_bytes=peak,
        step_mem_bytes=max(0, peak - before),
        fwd_bwd_mem_bytes=fwd_bwd[0],
        fwd_bwd_peak_bytes=fwd_bwd[1],
        fwd_bwd_s=fwd_bwd[2],
    )


def _fwd_bwd_memory(loss_fn: Callable[[], torch.Tensor], autocast, device: torch.device) -> tuple[int, int, float]:
    """(rise, process peak, seconds) of one forward + backward pass. The rise is the activations and
    gradients, the part activation checkpointing changes; the optimizer update is left out."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = current_rss_bytes()
        reset_peak_rss()
    start = time.perf_counter()
    with autocast:
        loss = loss_fn()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    return max(0, peak - base), peak, time.perf_counter() - start
