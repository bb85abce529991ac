"""Every shipped Base recipe pinned, key by key, to the reference config it reproduces.

The values below were read off fundamentalvision/Uni-Perceiver (a8c9e37),
configs/BERT_L12_H768_experiments/<file> (plus base_model_bert_l12_h768.yaml and the defaults in
uniperceiver/config/defaults.py for keys a file leaves out): DROP_PATH_PROB, BASE_LR, BETAS, EPS,
WEIGHT_DECAY, GRAD_CLIP, WARMUP, MIN_LR, MAX_ITER, TRAIN_BATCH_SIZE, LOSS_WEIGHT, LABELSMOOTHING,
MAX_SEQ_LEN, FRAMES_PER_CLIP, STRIDE, DATA_PERCENTAGE, SHARE_DEEP_PROMPT, FC_PROMPT_OUT and
DECODE_STRATEGY (BEAM_SIZE, EVAL_MAX_SEQ_LEN, LEN_PENALTY; 0 where the key is absent or commented
out). A recipe that drifts from its reference fails here with the key, our value and the file.
Recipes without a reference config (MSR-VTT, VQA and GLUE prompt tuning, STS-B/WNLI fine-tuning) are
pinned to the reference recipe they copy, named in `BORROWED`.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from uniperceiver.config import expand_stages, load_recipe, recipes_dir

ROOT = recipes_dir()
REF = "configs/BERT_L12_H768_experiments/"

#: Shared by every reference prompt-tuning config.
PROMPT_COMMON: dict[str, Any] = {
    "model.overrides.image_size": 224, "model.overrides.spe_bias": True,
    "optim.betas": (0.9, 0.95), "optim.eps": 1e-6, "optim.weight_decay": 0.0, "optim.clip_grad": 0.1,
    "optim.min_lr": 1e-6, "optim.schedule": "cosine", "optim.layer_decay": None,
    "tune.mode": "prompt", "tune.prompt_tokens": 10, "tune.fraction": 0.01,
    "task.options.label_smoothing": 0.1,
}
#: Caption decoding of the prompt / fine-tuning configs: BEAM_SIZE 2, EVAL_MAX_SEQ_LEN 21, no LEN_PENALTY.
DECODE = {"task.options.beam_size": 2, "task.options.max_gen_len": 21, "task.options.length_penalty": 0.0}
VIDEO = {"task.options.frames": 4, "task.options.stride": 32}

PROMPT: dict[str, tuple[str, dict[str, Any]]] = {
    "coco-caption": ("prompt_tuning/mscoco_caption_prompt_tuning_0.01data_lr1e-3.yaml", {
        "model.overrides.drop_path": 0.2, "optim.lr": 1e-3, "optim.warmup_steps": 100, "train.max_steps": 1000,
        "task.batch_size": 32, "task.loss_weight": 2.0, "task.options.max_len": 30, "tune.share_deep_prompt": True,
        **DECODE}),
    "coco-retrieval": ("prompt_tuning/mscoco_retrieval_prompt_tuning_0.01data_lr1e-4.yaml", {
        "model.overrides.drop_path": 0.2, "optim.lr": 1e-3, "optim.warmup_steps": 50, "train.max_steps": 500,
        "task.batch_size": 256, "task.loss_weight": 0.5, "task.options.max_len": 30, "tune.share_deep_prompt": False}),
    "flickr30k-caption": ("prompt_tuning/flickr30k_caption_prompt_tuning_0.01data.yaml", {
        "model.overrides.drop_path": 0.1, "optim.lr": 1e-3, "optim.warmup_steps": 50, "train.max_steps": 500,
        "task.batch_size": 32, "task.loss_weight": 1.0, "task.options.max_len": 30, "tune.share_deep_prompt": True,
        **DECODE}),
    "flickr30k-retrieval": ("prompt_tuning/flickr30k_retrieval_prompt_tuning_0.01data.yaml", {
        "model.overrides.drop_path": 0.1, "optim.lr": 1e-3, "optim.warmup_steps": 50, "train.max_steps": 1000,
        "task.batch_size": 256, "task.loss_weight": 1.0, "task.options.max_len": 30, "tune.share_deep_prompt": False}),
    "imagenet": ("prompt_tuning/in1k_prompt_tuning_0.01data_lr1e-4.yaml", {
        "model.overrides.drop_path": 0.0, "model.overrides.cls_head_classes": 1000, "optim.lr": 1e-4,
        "optim.warmup_steps": 500, "train.max_steps": 2500, "task.batch_size": 64, "task.loss_weight": 1.0,
        "tune.share_deep_prompt": True}),
    "kinetics400": ("prompt_tuning/k400_prompt_tuning_0.01data.yaml", {
        "model.overrides.drop_path": 0.1, "model.overrides.cls_head_classes": 400, "optim.lr": 5e-4,
        "optim.warmup_steps": 200, "train.max_steps": 2000, "task.batch_size": 4, "task.loss_weight": 1.0,
        "task.options.frames": 8, "task.options.stride": 32, "tune.share_deep_prompt": True}),
    "msvd-caption": ("prompt_tuning/msvd_caption_prompt_tuning_0.01data_lr1e-3.yaml", {
        "model.overrides.drop_path": 0.1, "optim.lr": 1e-3, "optim.warmup_steps": 25, "train.max_steps": 200,
        "task.batch_size": 2, "task.loss_weight": 1.0, "task.options.max_len": 30, "tune.share_deep_prompt": True,
        **VIDEO, **DECODE}),
    "msvd-retrieval": ("prompt_tuning/msvd_retrieval_prompt_tuning_0.01data_lr1e-4.yaml", {
        "model.overrides.drop_path": 0.1, "optim.lr": 1e-3, "optim.warmup_steps": 10, "train.max_steps": 100,
        "task.batch_size": 16, "task.loss_weight": 1.0, "task.options.max_len": 30, "tune.share_deep_prompt": False,
        **VIDEO}),
}

FINETUNE_COMMON: dict[str, Any] = {
    "model.overrides.image_size": 224, "optim.betas": (0.9, 0.95), "optim.eps": 1e-6, "optim.weight_decay": 1e-4,
    "optim.clip_grad": 0.1, "optim.min_lr": 1e-6, "optim.schedule": "cosine", "optim.layer_decay": None,
    "tune.mode": "full", "tune.fraction": None,
}
GLUE_COMMON: dict[str, Any] = {
    "model.overrides.drop_path": 0.1, "optim.betas": (0.9, 0.98), "optim.eps": 1e-8, "optim.weight_decay": 0.1,
    "optim.clip_grad": 0.5, "optim.min_lr": 1e-8, "optim.schedule": "cosine", "optim.layer_decay": None,
    "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1, "task.options.max_len": 256,
}


def _glue(lr: float, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    return {**GLUE_COMMON, "optim.lr": lr, "train.max_steps": steps, "optim.warmup_steps": warmup, "task.batch_size": batch}


FINETUNE: dict[str, tuple[str, dict[str, Any]]] = {
    "coco-caption": ("finetuning/mscoco_caption_finetuning.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.2, "optim.lr": 2e-5, "optim.warmup_steps": 500,
        "train.max_steps": 10000, "task.batch_size": 32, "task.loss_weight": 2.0, "task.options.label_smoothing": 0.1,
        "task.options.max_len": 30, **DECODE}),
    "coco-retrieval": ("finetuning/mscoco_retrieval_finetuning.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.2, "optim.lr": 5e-6, "optim.warmup_steps": 500,
        "train.max_steps": 10000, "task.batch_size": 256, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1,
        "task.options.max_len": 30}),
    "flickr30k-caption": ("finetuning/flickr30k_caption_finetuning.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.1, "optim.lr": 2e-6, "optim.warmup_steps": 500,
        "train.max_steps": 4000, "task.batch_size": 32, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1,
        "task.options.max_len": 30, **DECODE}),
    "flickr30k-retrieval": ("finetuning/flickr30k_retrieval_finetuning.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.1, "optim.lr": 5e-6, "optim.warmup_steps": 200,
        "train.max_steps": 5000, "task.batch_size": 256, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1,
        "task.options.max_len": 30}),
    "imagenet": ("finetuning/in1k_training.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.1, "optim.lr": 2e-5, "optim.betas": (0.9, 0.999),
        "optim.weight_decay": 1e-8, "optim.warmup_steps": 2000, "optim.min_lr": 1e-8, "train.max_steps": 20000,
        "task.batch_size": 128, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1,
        "task.options.mixup": 0.0, "task.options.cutmix": 0.0}),
    "kinetics400": ("finetuning/k400_training.yaml", {  # CrossEntropy: no label smoothing
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.1, "optim.lr": 5e-6, "optim.warmup_steps": 2000,
        "train.max_steps": 40000, "task.batch_size": 8, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.0,
        "task.options.frames": 8, "task.options.stride": 32}),
    "msvd-caption": ("finetuning/msvd_caption_finetuning.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.1, "optim.lr": 2e-5, "optim.warmup_steps": 100,
        "train.max_steps": 1000, "task.batch_size": 2, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1,
        "task.options.max_len": 30, **VIDEO, **DECODE}),
    "msvd-retrieval": ("finetuning/msvd_retrieval_finetuning.yaml", {
        **FINETUNE_COMMON, "model.overrides.drop_path": 0.1, "optim.lr": 5e-6, "optim.warmup_steps": 200,
        "train.max_steps": 2000, "task.batch_size": 16, "task.loss_weight": 1.0, "task.options.label_smoothing": 0.1,
        "task.options.max_len": 30, **VIDEO}),
    "vqav2": ("finetuning/vqa_finetuning_debug.yaml", {  # CrossEntropy, PRED_TEMPERATURE 0.03, LEARN_TEMP False
        "model.overrides.image_size": 224, "model.overrides.drop_path": 0.1, "optim.lr": 4e-5,
        "optim.betas": (0.9, 0.999), "optim.eps": 1e-8, "optim.weight_decay": 0.05, "optim.clip_grad": 0.0,
        "optim.warmup_steps": 1000, "optim.min_lr": 1e-8, "train.max_steps": 20000, "task.batch_size": 64,
        "task.loss_weight": 0.1, "task.options.label_smoothing": 0.0, "task.options.max_len": 23,
        "task.options.fixed_temperature": 0.03}),
    "glue-cola": ("finetuning/GLUE_finetuning_experiments/GLUE_CoLA_mlm_finetune.yaml", _glue(1e-5, 5600, 400, 16)),
    "glue-mnli": ("finetuning/GLUE_finetuning_experiments/GLUE_MNLI_mlm_finetune.yaml", _glue(1e-5, 125000, 7500, 32)),
    "glue-mrpc": ("finetuning/GLUE_finetuning_experiments/GLUE_MRPC_mlm_finetune.yaml", _glue(1e-5, 2500, 150, 16)),
    "glue-qnli": ("finetuning/GLUE_finetuning_experiments/GLUE_QNLI_mlm_finetune.yaml", _glue(1e-5, 34000, 2000, 16)),
    "glue-qqp": ("finetuning/GLUE_finetuning_experiments/GLUE_QQP_mlm_finetune.yaml", _glue(1e-5, 115000, 28000, 32)),
    "glue-rte": ("finetuning/GLUE_finetuning_experiments/GLUE_RTE_mlm_finetune.yaml", _glue(2e-5, 2500, 150, 16)),
    "glue-sst2": ("finetuning/GLUE_finetuning_experiments/GLUE_SST2_mlm_finetune.yaml", _glue(1e-5, 22000, 1500, 32)),
}

#: Recipes with no reference config of their own -> (stage dir, the reference recipe whose values they copy).
BORROWED: dict[tuple[str, str], str] = {
    ("prompt", "msrvtt-caption"): "msvd-caption",
    ("prompt", "msrvtt-retrieval"): "msvd-retrieval",
    ("finetune", "msrvtt-caption"): "msvd-caption",
    ("finetune", "msrvtt-retrieval"): "msvd-retrieval",
    ("finetune", "glue-stsb"): "glue-mrpc",
    ("finetune", "glue-wnli"): "glue-rte",
}
#: Keys a borrowing recipe may not copy (the task's own shape).
NOT_BORROWED = ("task.batch_size",)


def value(recipe: Any, key: str) -> Any:
    """A dotted key of a loaded recipe; `task.` is its single task (TaskConfig fields, then options)."""
    parts = key.split(".")
    if parts[0] == "task":
        assert len(recipe.tasks) == 1, f"{recipe.name}: expected one task"
        obj: Any = recipe.tasks[0]
        parts = parts[1:]
    else:
        obj = recipe
    for part in parts:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return tuple(obj) if isinstance(obj, list) else obj


def _check(path: str, reference: str, expected: dict[str, Any]) -> None:
    recipe = load_recipe(ROOT / path)
    wrong = []
    for key, want in expected.items():
        got = value(recipe, key)
        same = math.isclose(got, want, rel_tol=1e-9) if isinstance(want, float) and isinstance(got, (int, float)) \
            else got == want
        if not same:
            wrong.append(f"{key}: recipe {got!r}, reference {want!r}")
    assert not wrong, f"recipes/{path} differs from {REF}{reference}:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("task", sorted(PROMPT))
def test_prompt_recipe_is_its_reference_config(task: str) -> None:
    reference, expected = PROMPT[task]
    _check(f"prompt/{task}.yaml", reference, {**PROMPT_COMMON, **expected})


@pytest.mark.parametrize("task", sorted(FINETUNE))
def test_finetune_recipe_is_its_reference_config(task: str) -> None:
    reference, expected = FINETUNE[task]
    _check(f"finetune/{task}.yaml", reference, expected)


@pytest.mark.parametrize("stage, task", sorted(BORROWED))
def test_recipe_without_reference_copies_the_named_one(stage: str, task: str) -> None:
    source = BORROWED[(stage, task)]
    reference, expected = (PROMPT if stage == "prompt" else FINETUNE)[source]
    common = PROMPT_COMMON if stage == "prompt" else {}
    kept = {k: v for k, v in {**common, **expected}.items() if k not in NOT_BORROWED}
    _check(f"{stage}/{task}.yaml", f"{reference} (borrowed from {source})", kept)


def test_only_retrieval_prompt_tuning_keeps_target_prompts_apart() -> None:
    """SHARE_DEEP_PROMPT is False in the reference's retrieval prompt configs only."""
    apart = sorted(p.stem for p in (ROOT / "prompt").glob("*.yaml") if not load_recipe(p).tune.share_deep_prompt)
    assert apart == ["coco-retrieval", "flickr30k-retrieval", "msrvtt-retrieval", "msvd-retrieval"]


def test_base_pretraining_stages_are_the_reference_configs() -> None:
    """16tasks_training_basedense_stage1_64gpu.yaml, then ..._stage2_64gpu.yaml."""
    (_, one), (_, two) = expand_stages(load_recipe(ROOT / "base.yaml"))
    stage1 = {"model.overrides.image_size": 160, "model.overrides.drop_path": 0.1, "optim.lr": 1e-3,
              "optim.betas": (0.9, 0.95), "optim.eps": 1e-6, "optim.weight_decay": 0.2, "optim.clip_grad": 0.1,
              "optim.warmup_steps": 10000, "optim.min_lr": 1e-6, "optim.schedule": "cosine", "train.max_steps": 200000}
    stage2 = {**stage1, "model.overrides.image_size": 224, "optim.lr": 2e-5, "optim.weight_decay": 0.05,
              "optim.warmup_steps": 5000, "train.max_steps": 45000}
    for recipe, expected in ((one, stage1), (two, stage2)):
        for key, want in expected.items():
            assert value(recipe, key) == want, f"{recipe.name}: {key}"
    tasks1 = {t.name: t for t in one.tasks}
    tasks2 = {t.name: t for t in two.tasks}
    # losses: classification and retrieval smooth by 0.1, captioning and MLM are plain cross entropy
    assert all(t.options["label_smoothing"] == 0.0 for n, t in tasks1.items() if "caption" in n or "mlm" in n)
    assert all(t.options["label_smoothing"] == 0.1 for n, t in tasks1.items() if "retrieval" in n)
    assert (tasks1["imagenet21k"].options["mixup"], tasks1["imagenet21k"].options["cutmix"]) == (0.8, 1.0)
    assert (tasks2["imagenet21k"].options["mixup"], tasks2["imagenet21k"].options["cutmix"]) == (0.0, 0.0)
    assert (tasks2["kinetics700"].options["frames"], tasks2["kinetics700"].batch_size) == (8, 12)
    # stage 2 halves every loss weight but ImageNet-21k's (1.0 in both files)
    halved = {n: t.loss_weight if n == "imagenet21k" else t.loss_weight / 2 for n, t in tasks1.items()}
    assert {n: t.loss_weight for n, t in tasks2.items()} == halved
    assert (tasks2["kinetics700"].sample_weight, tasks2["mit"].sample_weight) == (1.0, 0.2)
