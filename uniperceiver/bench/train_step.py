"""Training-step benchmarks: ours against Hugging Face BertModel (text) and timm ViT (images).

Every case does the same work: forward, a mean-square loss over the final hidden states, backward
and one AdamW step, on the same batch shapes and with the same width and depth. Run one case per
process (see `worker.py`) so that the peak memory of a case is its own.

Levers on our step, one field of `StepCase` each, so that one run measures them one by one:
`compile_scope` (the encoder, as `train.compile` does, or the whole forward with embeddings and
loss), `compile_mode` (torch.compile's, e.g. max-autotune-no-cudagraphs), `cuda_graphs` (the
whole step, optimizer included, replayed from one CUDA graph: fixed shapes only), `optim_state`
(AdamW moments in bf16) and `loss` (the chunked contrastive loss for image-text pairs). Every CUDA
result also carries the step's host synchronisations and its time when steps are issued back to
back (`pipelined_s`), the figure a loop without host syncs reaches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from uniperceiver.bench.flops import train_step_flops
from uniperceiver.bench.timing import (Timing, count_host_syncs, current_rss_bytes, peak_rss_bytes, reset_peak_rss,
                                       time_fn, time_pipelined)
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
    compile_scope: str = "encoder"  # "step": compile the whole forward + loss (embeddings, head, loss too)
    compile_mode: str = "default"  # torch.compile's mode, e.g. "max-autotune-no-cudagraphs"
    cuda_graphs: bool = False  # capture forward + backward + optimizer step as one CUDA graph, replay it
    optim_state: str = "fp32"  # "bf16": AdamW's two moments stored in bf16 (`AdamWBf16State`)
    loss: str = "plain"  # image-text pairs: "plain" (two cross entropies) or "chunked" (modeling.contrastive)

    def __post_init__(self) -> None:
        """Refuse lever combinations that would silently measure something else than their name says."""
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope {self.compile_scope!r}: expected one of {', '.join(COMPILE_SCOPES)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
        if not self.compile and (self.compile_scope != "encoder" or self.compile_mode != "default"):
            raise ValueError("compile_scope and compile_mode need compile=True")
        if self.optim_state not in OPTIM_STATES:
            raise ValueError(f"optim_state {self.optim_state!r}: expected one of {', '.join(OPTIM_STATES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.loss != "plain" and (self.impl != "ours" or self.kind != "retrieval"):
            raise ValueError(f"loss {self.loss!r} applies to our image-text pairs (kind retrieval) only")
        if self.cuda_graphs and self.measure_memory:
            raise ValueError("cuda_graphs and measure_memory do not combine (the memory pass is not captured)")


COMPILE_SCOPES = ("encoder", "step")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIM_STATES = ("fp32", "bf16")
LOSSES = ("plain", "chunked")


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
    pipelined_s: float = 0.0  # mean step time issued back to back, one sync at the end (CUDA only)
    host_syncs: int = -1  # synchronising CUDA calls in one step (-1: not measured, off CUDA)
    warmup_s: float = 0.0  # wall time of the optimizer-state step and the warm-up steps: compilation included
    compiled_graphs: int = 0  # graphs torch.compile produced in this process (graph breaks add graphs)
    peak_reserved_bytes: int = 0  # CUDA: the caching allocator's peak, a CUDA graph's memory pool included
    graph_breaks: int = 0


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
        seq = (1 + frames * cfg.grid_size**2) + (1 + case.text_len)
        if case.loss == "chunked":
            from uniperceiver.modeling.contrastive import chunked_contrastive_loss

            def chunked_pair_loss() -> torch.Tensor:
                img = model.encode(images, temporal_offset=0)
                txt = model.encode(texts)
                return chunked_contrastive_loss(img, txt, model.logit_scale("retrieve")).total

            return model, chunked_pair_loss, seq

        def pair_loss() -> torch.Tensor:
            img = model.encode(images, temporal_offset=0)
            txt = model.encode(texts)
            logits = model.logits(img, txt, "retrieve")
            return torch.nn.functional.cross_entropy(logits.float(), labels) + torch.nn.functional.cross_entropy(
                logits.float().t(), labels)

        return model, pair_loss, seq

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


def to_bf16_stochastic(x: Tensor) -> Tensor:
    """fp32 -> bf16 with stochastic rounding: up with probability equal to the dropped fraction, so
    the expected value is x. Round-to-nearest would freeze an EMA whose step is under half a bf16
    spacing: AdamW's second moment with beta2 0.999 moves by 0.1% per step, bf16 resolves 0.4%.

    Adds 16 random bits below the kept ones and truncates (the float's bits as an int32)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _adamw_bf16_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float) -> None:
    """torch's AdamW update of one parameter (decoupled weight decay, bias corrections) in fp32 math,
    reading and writing the moments in bf16 (stochastic rounding). `step` is a 0-dim tensor on the
    parameter's device, so the update has no host sync and can be captured in a CUDA graph."""
    step += 1
    g32 = g.float()
    m32 = m.float().lerp(g32, 1 - beta1)
    v32 = v.float().mul(beta2).addcmul(g32, g32, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    p.mul_(1 - lr * weight_decay)
    p.sub_(m32 / ((v32 / bias2).sqrt() + eps) * (lr / bias1))
    m.copy_(to_bf16_stochastic(m32))
    v.copy_(to_bf16_stochastic(v32))


class AdamWBf16State(torch.optim.Optimizer):
    """AdamW with fp32 parameters and update math but its two moments stored in bf16.

    Why: the moments are 8 of the 16 bytes per parameter that training keeps besides activations
    (0.65 GB at base), and the optimizer step reads and writes them every step. torch's fused
    AdamW needs the state in the parameters' dtype, so this keeps its own update: written plainly,
    and with `compile=True` compiled once, for flattened parameters of any length (dynamic shapes),
    into one fused kernel per parameter, so every parameter set reuses one compiled graph (eager
    it launches a dozen kernels per parameter). Stochastic rounding keeps the moments unbiased (`to_bf16_stochastic`);
    it draws from the global RNG, so a run's random stream differs from one with fp32 state.
    Learning rate, betas, eps and weight decay are read as Python numbers each step (a schedule that
    changes lr recompiles unless torch.compile treats floats as dynamic, its default since 2.6).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 compile: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._update = torch.compile(_adamw_bf16_update, fullgraph=True, dynamic=True) if compile else _adamw_bf16_update

    def init_state(self) -> None:
        """Allocate the moments of every parameter now (torch's optimizers do it at the first step)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self.state:
                    self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format),
                    }

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.init_state()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                self._update(p.view(-1), p.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                             state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"])
        return loss


@dataclass
class PreparedStep:
    """A built and warmed-up training step (compiled and captured where the case asks), ready to time."""

    case: StepCase
    device: torch.device
    model: torch.nn.Module
    loss_fn: Callable[[], Tensor]
    optimizer: torch.optim.Optimizer
    eager_step: Callable[[], None]  # one training step run op by op, never captured
    seq: int
    flops: int
    warmup_s: float
    fwd_bwd: tuple[int, int, float]
    capture: Callable[[], Callable[[], None]] | None = None  # cuda_graphs: captures the step, returns its replay
    _replay: Callable[[], None] | None = None

    @property
    def step(self) -> Callable[[], None]:
        """What is timed: one training step, a CUDA-graph replay with cuda_graphs. The graph is
        captured on first use, so that a case waiting for its timed run holds no graph memory pool
        (it keeps a whole step's activations for good)."""
        if self.capture is None:
            return self.eager_step
        if self._replay is None:
            self._replay = self.capture()
        return self._replay

    def release_memory(self) -> None:
        """Hand cached, unused device memory back (a CUDA-graph pool stays): while this case waits
        for its timed run, other cases compile beside it on the same device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def _optimizer(case: StepCase, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The same optimizer for every implementation (the fused kernel our trainer uses), so the ratio
    compares the models; bf16 moments are our lever (compiled update on CUDA, see `AdamWBf16State`)."""
    if case.optim_state == "bf16":
        return AdamWBf16State(model.parameters(), lr=1e-4, compile=device.type == "cuda")
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=case.cuda_graphs)


def _compile(case: StepCase, model: torch.nn.Module, loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """Apply torch.compile as the case says; returns the (possibly compiled) loss function."""
    mode = None if case.compile_mode == "default" else case.compile_mode
    if case.compile_scope == "step":  # embeddings, encoder, head and loss in one graph (and its backward)
        return torch.compile(loss_fn, mode=mode)
    if isinstance(model, UniPerceiver):
        model.encoder.compile(mode=mode)
    elif case.impl == "timm-vit":  # the step calls forward_features, which Module.compile() skips
        model.forward_features = torch.compile(model.forward_features, mode=mode)
    else:
        model.compile(mode=mode)
    return loss_fn


def prepare_step_case(case: StepCase, device: torch.device, warmup: int = 1) -> PreparedStep:
    """Build the case, allocate the optimizer state, run `warmup` steps (compiling on the first) and,
    with cuda_graphs, arrange the capture of one step (done on first use of `PreparedStep.step`).
    Timed separately by `time_step_case`."""
    if case.cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs needs a CUDA device")
    model, loss_fn, seq = BUILDERS[case.impl](case, device)
    if case.compile:
        loss_fn = _compile(case, model, loss_fn)
    opt = _optimizer(case, model, device)
    # Graph capture needs autocast's weight-cast cache off (a cached cast would be a captured
    # tensor that eager code outside the graph frees).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16",
                              cache_enabled=False if case.cuda_graphs else None)

    def step() -> None:
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Allocate the optimizer state first (a step on zero gradients, no forward pass) so that the
    # peak measured next is the step's own activations and gradients on top of a known base.
    start = time.perf_counter()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    fwd_bwd = _fwd_bwd_memory(loss_fn, autocast, device) if case.measure_memory else (0, 0, 0.0)
    opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    capture = (lambda: _capture_step(step, loss_fn, autocast, opt, device)) if case.cuda_graphs else None
    return PreparedStep(case=case, device=device, model=model, loss_fn=loss_fn, optimizer=opt, eager_step=step,
                        seq=seq, flops=_step_flops(case), warmup_s=time.perf_counter() - start, fwd_bwd=fwd_bwd,
                        capture=capture)


def _capture_step(step: Callable[[], None], loss_fn: Callable[[], Tensor], autocast: Any,
                  opt: torch.optim.Optimizer, device: torch.device, warmup: int = 2) -> Callable[[], None]:
    """Capture forward, backward and optimizer step in one CUDA graph; returns its replay.

    The recipe of torch's "whole network capture": warm up on a side stream (compilation, cuBLAS
    handles, lazy optimizer state), gradients None before capture so backward allocates them from
    the graph's pool, and no zero_grad inside (each replay overwrites them). Fixed shapes only, and
    nothing in the step may read a tensor on the host (that is a sync, refused during capture).
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
    return graph.replay


def _step_flops(case: StepCase) -> int:
    cfg = model_config(case.size, image_size=case.image_size)
    text = 2 * case.text_len if case.kind == "caption" else case.text_len
    if case.impl == "ours" and case.kind == "retrieval":  # two sequences per pair
        return train_step_flops(cfg, case.batch, frames=case.frames) + train_step_flops(cfg, case.batch, text_len=case.text_len)
    if case.impl == "ours":
        return train_step_flops(cfg, case.batch, text_len=text, frames=case.frames)
    if case.impl == "bert":
        return train_step_flops(cfg, case.batch, text_len=case.text_len)
    return train_step_flops(cfg, case.batch, frames=1)


def _compile_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from torch.compile's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))


def time_step_case(prep: PreparedStep, repeats: int = 3, warmup: int = 0) -> StepResult:
    """Time a prepared step: `warmup` more untimed steps, then the median of `repeats` synchronised
    steps and their peak memory; on CUDA also `repeats` steps back to back and one step's host syncs."""
    case, device = prep.case, prep.device
    if repeats <= 0 and not case.measure_memory:
        raise ValueError("repeats=0 needs measure_memory (there would be nothing to report)")
    for _ in range(warmup):
        prep.step()
    fwd_bwd = prep.fwd_bwd
    before = current_rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    pipelined_s, host_syncs, reserved = 0.0, -1, 0
    if repeats > 0:
        timing = time_fn(prep.step, warmup=0, repeats=repeats, device=device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
        if device.type == "cuda":
            # A graph's activations live in its private pool: reserved, not allocated, between replays.
            reserved = torch.cuda.max_memory_reserved(device)
            pipelined_s = time_pipelined(prep.step, repeats, device)
            host_syncs = count_host_syncs(prep.step, device)
    else:  # memory only: the one forward + backward pass stands for the step's time
        timing, peak, before = Timing(fwd_bwd[2], fwd_bwd[2], 0), fwd_bwd[1], fwd_bwd[1] - fwd_bwd[0]
    graphs, breaks = _compile_counts() if case.compile else (0, 0)
    flops = prep.flops
    return StepResult(
        case=asdict(case),
        median_s=timing.median_s,
        samples_per_s=case.batch / timing.median_s,
        tokens_per_s=case.batch * prep.seq / timing.median_s,
        flops_per_step=flops,
        achieved_flops=flops / timing.median_s,
        peak_mem_bytes=peak,
        step_mem_bytes=max(0, peak - before),
        fwd_bwd_mem_bytes=fwd_bwd[0],
        fwd_bwd_peak_bytes=fwd_bwd[1],
        fwd_bwd_s=fwd_bwd[2],
        pipelined_s=pipelined_s,
        host_syncs=host_syncs,
        warmup_s=prep.warmup_s,
        compiled_graphs=graphs,
        graph_breaks=breaks,
        peak_reserved_bytes=reserved,
    )


def run_step_case(case: StepCase, device: torch.device, warmup: int = 1, repeats: int = 3) -> StepResult:
    """Build, warm up and time one case in this process."""
    if repeats <= 0 and not case.measure_memory:
        raise ValueError("repeats=0 needs measure_memory (there would be nothing to report)")
    return time_step_case(prepare_step_case(case, device, warmup), repeats)


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
