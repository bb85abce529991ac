"""Every key a recipe accepts has an effect: each one, set to two values, changes something observable.

Why: a key that is validated and shown but never read (as `eval.beam_size` was) is worse than an
unknown key: the run silently ignores what the researcher asked for. So the schema is walked with
`dataclasses.fields` (the recipe sections, every `tasks[]` and `stages[]` field, and every option of
every task family), and each key must have an entry in `RECIPE_PROBES` / `OPTION_PROBES`:

- `Rec` / `Opt`: build the recipe (or task) with value `a` and with value `b`, observe it through
  the code the trainer and the evaluation run (the optimizer and schedule, the model, the training
  tasks and samples, `evaluate_tasks`, a real two-step `train` run, a task's loaded batches, its
  loss, its predictions, its target set) and require a difference;
- `Refused`: the key takes a single value, any other is refused with one line naming it;
- `Elsewhere`: the effect needs something this file cannot afford (NaN losses, several processes,
  a GPU, ImageNet-21k synonyms): the named test proves it, and this file checks that it exists and
  mentions the key.

A key added without an entry fails `test_every_key_has_a_probe`, so a new key proves its effect.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fixtures.layouts import make_vqav2
from typer.testing import CliRunner

from uniperceiver.config import recipe_from_dict, recipe_to_dict
from uniperceiver.config.loading import expand_stages
from uniperceiver.config.schema import Recipe
from uniperceiver.data.format import prepare_dataset
from uniperceiver.engine.distributed import DistEnv
from uniperceiver.engine.optim import build_optimizer, build_scheduler
from uniperceiver.engine.periodic_eval import evaluate_tasks
from uniperceiver.engine.run_setup import (
    build_training_model,
    build_training_tasks,
    preflight,
    run_label,
)
from uniperceiver.engine.runs import CKPT_DIR, read_metrics
from uniperceiver.engine.trainer import train
from uniperceiver.engine.tuning import setup_tuning
from uniperceiver.errors import ConfigError, UpctlError
from uniperceiver.evaluation.harness import target_features
from uniperceiver.modeling import build_model
from uniperceiver.modeling.model_dir import save_model
from uniperceiver.tasks import FAMILIES, build_task, task_config
from uniperceiver.tasks.catalog import family_options
from uniperceiver.tasks.options import FieldError, TaskConfig
from upctl.main import app
from _trainer_fixtures import one_thread  # noqa: E402,F401  (shared fixture: one intra-op thread)

REPO = Path(__file__).resolve().parents[1]
#: A model small enough that a probe costs milliseconds.
MICRO = {"depth": 1, "width": 64, "heads": 2, "mlp_dim": 128}


# -- the table's entries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    """Recipe key set to `a`, then `b` (on top of `extra` --set overrides), observed by `observe`."""

    a: Any
    b: Any
    observe: str
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Opt:
    """Task option set to `a`, then `b` (besides `extra` options) on `task` (default: the family's)."""

    a: Any
    b: Any
    observe: str
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """The key takes one value only (its default); `value` is refused with a line naming the key."""

    value: Any
    fragment: str


@dataclass(frozen=True)
class Elsewhere:
    """The effect is proven by another test: "tests/test_x.py::test_name"."""

    test: str


@dataclass(frozen=True)
class Pending:
    """A key whose proof is still being written (reported as xfail, never silently passed): what it needs."""

    needs: str


# Training-loop keys observed through a real two-step `train` run ("run") unless they need more.
_TWO_TASKS = ('tasks=[{name: mini-faces, batch_size: 4}, {name: mini-digits, batch_size: 4}]',)

RECIPE_PROBES: dict[str, Rec | Elsewhere | Pending] = {
    "name": Rec("one", "two", "label", _TWO_TASKS),
    "stage": Rec("pretrain", "prompt_tune", "model"),
    "model.size": Rec("tiny", "small", "model"),
    "model.overrides": Rec(MICRO, {**MICRO, "depth": 2}, "model"),
    "model.checkpoint": Rec(None, "<checkpoint>", "model"),
    "optim.lr": Rec(1e-3, 5e-4, "optimizer"),
    "optim.betas": Rec([0.9, 0.95], [0.8, 0.9], "optimizer"),
    "optim.eps": Rec(1e-6, 1e-8, "optimizer"),
    "optim.weight_decay": Rec(0.2, 0.0, "optimizer"),
    "optim.clip_grad": Rec(None, 1e-6, "run"),
    "optim.warmup_steps": Rec(1, 3, "optimizer"),
    "optim.min_lr": Rec(1e-6, 1e-4, "optimizer"),
    "optim.schedule": Rec("cosine", "linear", "optimizer", ("train.max_steps=8",)),
    "optim.layer_decay": Rec(None, 0.5, "optimizer"),
    "train.max_steps": Rec(1, 2, "run"),
    "train.grad_accum": Rec(1, 2, "run"),
    "train.precision": Rec("fp32", "bf16", "run"),
    "train.seed": Rec(0, 1, "run"),
    "train.log_every": Rec(1, 2, "run"),
    "train.eval_every": Rec(0, 1, "run", ("eval.limit=2",)),
    "train.ckpt_every": Rec(0, 1, "run"),
    "train.keep_checkpoints": Rec(1, 3, "run", ("train.ckpt_every=1", "train.max_steps=3")),
    "train.nan_policy": Elsewhere("tests/test_trainer.py::test_nan_policy_skip_counts_skipped_steps"),
    "train.num_workers": Elsewhere(
        "tests/test_trainer.py::test_loader_workers_follow_the_same_plan_and_resume_from_consumed_state"),
    "train.compile": Elsewhere("tests/test_gpu.py::test_compiled_encoder_equals_eager"),
    "train.gather_features": Rec(None, False, "gathering", ("tasks=[mini-photos-retrieval]",)),
    "train.sharding": Elsewhere("tests/test_fsdp.py::test_fsdp_matches_ddp_and_resumes_exactly"),
    "train.step_timeout_s": Elsewhere(
        "tests/reliability/test_hangs.py::test_a_rank_stuck_in_a_read_ends_the_job_naming_each_rank_and_its_phase"),
    "train.collective_timeout_s": Elsewhere(
        "tests/reliability/test_hangs.py::test_without_the_step_watchdog_the_collective_timeout_ends_the_job"),
    # only the value `stage` implies is allowed ("prompt" with prompt_tune, else "full"): another is refused
    "tune.mode": Rec("full", "prompt", "model"),
    "tune.prompt_tokens": Rec(2, 4, "model", ("stage=prompt_tune",)),
    "tune.share_deep_prompt": Rec(True, False, "model", ("stage=prompt_tune",)),
    "tune.fraction": Rec(None, 0.5, "training_tasks"),
    "tune.fraction_seed": Rec(0, 1, "training_tasks", ("tune.fraction=0.1",)),
    # The task trains on val here, so eval.split=val is refused as training data (no evaluation) and
    # eval.split=train is scored: periodic evaluation never scores a split the task trains on.
    "eval.split": Rec("val", "train", "evaluation", ('tasks=[{name: mini-faces, batch_size: 4, split: val}]',)),
    "eval.limit": Rec(2, 3, "evaluation"),
    "stages[].name": Rec("one", "two", "stages", ('stages=[{name: one, set: {}}]',)),
    "stages[].set": Rec({}, {"optim.lr": 5e-4}, "stages", ('stages=[{name: one, set: {}}]',)),
    "data_dir": Rec("<data>", "<empty>", "preflight"),
    "description": Rec("first words", "other words", "summary"),
    "tasks[].name": Rec("mini-faces", "faces-again", "training_tasks",
                        ("tasks.0.family=image_cls", "tasks.0.dataset=mini-faces")),
    "tasks[].family": Rec("caption", "retrieval", "training_tasks",
                          ("tasks=[{name: photos, family: caption, dataset: mini-photos}]",)),
    "tasks[].dataset": Rec("mini-faces", "mini-digits", "training_tasks",
                           ("tasks=[{name: faces, family: image_cls, dataset: mini-faces}]",)),
    "tasks[].split": Rec("train", "val", "training_tasks"),
    "tasks[].eval_split": Rec("val", "train", "evaluation", ("eval.split=test",)),
    "tasks[].batch_size": Rec(2, 4, "run"),
    "tasks[].sample_weight": Rec(1.0, 0.0, "run", _TWO_TASKS),
    "tasks[].loss_weight": Rec(1.0, 0.0, "run"),
    "tasks[].options": Rec({}, {"hflip": False}, "training_tasks"),  # and every option: OPTION_PROBES
}

#: The task each family's options are probed on (mini data, or the VQAv2 fixture layout).
FAMILY_TASK = {"image_cls": "mini-faces", "video_cls": "mini-video", "retrieval": "mini-photos-retrieval",
               "caption": "mini-photos-caption", "mlm": "mini-news-mlm", "vqa": "vqav2", "glue": "mini-sentiment"}
#: The same family on video samples (video options) or on image samples (image options).
VIDEO_TASK = "mini-video-retrieval"
IMAGE_TASK = "mini-faces"


def _media(family: str) -> dict[str, Opt | Refused]:
    pair = family in ("caption", "retrieval")
    image = None if pair else IMAGE_TASK  # caption / retrieval need captions: their own mini-photos task
    return {
        "image_size": Opt(None, 32, "eval_batch", image),
        "eval_resize": Opt(None, 128, "eval_batch", image),
        "frames": Opt(2, 4, "eval_batch", VIDEO_TASK),
        "stride": Opt(4, 16, "eval_batch", VIDEO_TASK, {"frames": 4}),
        "sampling": Opt("stride", "uniform", "eval_batch", VIDEO_TASK, {"frames": 4}),
        "target_fps": Opt(30.0, 10.0, "eval_batch", VIDEO_TASK, {"frames": 4, "stride": 8}),
        "views": Refused([2, 1], "1x1") if family == "caption" else Opt("1x1", "2x1", "eval_batch", VIDEO_TASK),
        "hflip": Opt(True, False, "train_batch", image),
        "crop_scale": Refused([0.5, 1.0], "random resized crop") if pair
        else Opt([0.08, 1.0], [1.0, 1.0], "train_batch", IMAGE_TASK),
    }


def _common() -> dict[str, Opt]:
    return {"eval_batch_size": Opt(None, 3, "eval_batch_size"), "label_smoothing": Opt(0.0, 0.5, "loss")}


_CLS: dict[str, Opt | Refused | Elsewhere] = {
    "mixup": Opt(0.0, 0.8, "train_batch", IMAGE_TASK),
    "cutmix": Opt(0.0, 1.0, "train_batch", IMAGE_TASK),
    "mixup_prob": Opt(1.0, 0.0, "train_batch", IMAGE_TASK, {"mixup": 0.8}),
    "mixup_switch_prob": Opt(0.0, 1.0, "train_batch", IMAGE_TASK, {"mixup": 0.8, "cutmix": 1.0}),
    "template": Opt("{}", "a photo of {}", "targets", IMAGE_TASK),
    "target_max_len": Opt(30, 2, "targets", IMAGE_TASK),
    "targets": Opt("names", "images", "predict", IMAGE_TASK, {"target_examples": {"per_class": 1, "split": "train"}}),
    "target_examples": Opt({"per_class": 1, "split": "train"}, {"per_class": 2, "split": "train", "seed": 1},
                           "predict", IMAGE_TASK, {"targets": "images"}),
    "synonyms": Elsewhere("tests/test_tasks_vision.py::test_synonyms_are_sampled_per_class_per_batch"),
}

OPTION_PROBES: dict[str, dict[str, Opt | Refused | Elsewhere]] = {
    "image_cls": {**_common(), **_media("image_cls"), **_CLS},
    "video_cls": {**_common(), **_media("video_cls"), **_CLS},
    "retrieval": {**_common(), **_media("retrieval"),
                  "max_len": Opt(30, 3, "train_batch"),
                  "gather_features": Opt(None, True, "gathering")},
    "caption": {**_common(), **_media("caption"),
                "max_len": Opt(30, 3, "train_batch"),
                "vocab": Opt("full", "corpus", "targets"),
                "beam_size": Opt(1, 3, "predict", extra={"max_gen_len": 6}),
                "max_gen_len": Opt(2, 6, "predict"),
                # an untrained model never ends a beam early, so the penalty has nothing to rank; the
                # option reaches `beam_search` on the same line as beam_size and max_gen_len (above)
                "length_penalty": Elsewhere("tests/test_decoding.py::test_search_rules_on_a_known_distribution"),
                # METEOR starts Java for seconds; the option reaches `caption_scores` beside spice (above)
                "meteor": Elsewhere("tests/test_caption_metrics.py::test_identical_captions_score_perfect"),
                "spice": Opt(False, True, "metrics", extra={"meteor": False})},
    "mlm": {**_common(),
            "max_len": Opt(128, 16, "train_batch"),
            "min_words": Opt(None, 5, "train_batch"),
            "mask_prob": Opt(0.15, 0.9, "train_batch"),
            "vocab": Opt("full", "corpus", "targets"),
            "eval_seed": Opt(0, 1, "eval_batch")},
    "vqa": {**_common(),
            "max_len": Opt(23, 4, "eval_batch"),
            "answer_max_len": Opt(16, 2, "targets"),
            "image_size": Opt(None, 32, "eval_batch"),
            "train_transform": Opt("reference", "random_resized", "train_batch"),
            "hflip": Opt(True, False, "train_batch"),
            "scale": Opt(None, "tqa_mlm", "loss"),
            "fixed_temperature": Opt(None, 0.03, "loss")},
    "glue": {**_common(),
             "glue_task": Opt("sst2", "cola", "targets"),
             "words": Opt(None, ["awful", "great"], "targets"),
             "max_len": Opt(256, 8, "eval_batch"),
             "scale": Opt("text_mlm", "tqa_mlm", "loss")},
}


# -- walking the schema ----------------------------------------------------------------------------------


def schema_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every leaf key of the recipe schema, dotted; list items as `tasks[].batch_size`."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], f"{prefix}{f.name}"
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            keys += schema_keys(item, f"{name}[].")
        else:
            keys.append(name)
    return keys


def test_every_key_has_a_probe():
    """A key added to the schema or to a family's options without an entry here fails (and a stale entry too)."""
    assert sorted(RECIPE_PROBES) == sorted(schema_keys())
    assert "tasks[].options" in RECIPE_PROBES and set(OPTION_PROBES) == set(FAMILIES)
    for family in FAMILIES:
        assert sorted(OPTION_PROBES[family]) == sorted(family_options(family).keys()), family


def _elsewhere() -> list[tuple[str, Elsewhere]]:
    out = [(k, p) for k, p in RECIPE_PROBES.items() if isinstance(p, Elsewhere)]
    return out + [(f"{f}.{k}", p) for f, t in OPTION_PROBES.items() for k, p in t.items() if isinstance(p, Elsewhere)]


@pytest.mark.parametrize("key,probe", _elsewhere(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_key_proven_elsewhere_names_an_existing_test_that_uses_it(key, probe):
    path, name = probe.test.split("::")
    source = (REPO / path).read_text()
    functions = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert name in functions, probe.test
    test = functions[name]
    # the test itself, a fixture of its module that it takes, or a helper of its module that it calls
    body = ast.get_source_segment(source, test) or ""
    parts = [test] + [f for n, f in functions.items() if n in {a.arg for a in test.args.args} or f"{n}(" in body]
    text = "\n".join(ast.get_source_segment(source, f) or "" for f in parts)
    leaf = key.split(".")[-1]
    used = {"compile": "compile()"}.get(leaf, leaf)  # train.compile reaches `model.encoder.compile()`
    about = ast.get_docstring(ast.parse(source)) or ""  # or the module says it is about the key
    assert used in text or key in about, (key, probe.test)


def test_pending_keys_are_reported_until_their_tests_exist():
    """A key marked Pending is reported as xfail (never silently passed) until a test proves it."""
    pending = {k: p.needs for k, p in RECIPE_PROBES.items() if isinstance(p, Pending)}
    if pending:
        pytest.xfail("; ".join(f"{k}: no test proves its effect yet; needs {needs}" for k, needs in pending.items()))


def test_decoding_keys_of_the_eval_section_are_refused_and_point_to_the_caption_task():
    for key in ("beam_size", "max_gen_len", "length_penalty"):
        with pytest.raises(ConfigError) as info:
            recipe_from_dict({"name": "r", "tasks": ["mini-photos-caption"], "eval": {key: 3}})
        msg = str(info.value)
        assert "\n" not in msg and f"eval.{key}: unknown key (allowed: split, limit)" in msg, msg
        assert f"tasks[i].options.{key}" in msg, msg
    r = recipe_from_dict({"name": "r", "tasks": [{"name": "mini-photos-caption", "options": {"beam_size": 3}}]})
    assert r.tasks[0].options["beam_size"] == 3


# -- shared inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Every `mini` dataset, plus VQAv2 from its official fixture layout."""
    root = tmp_path_factory.mktemp("keys-data")
    prepare_dataset("mini", None, root)
    make_vqav2(root / "vqa-raw")
    prepare_dataset("vqav2", root / "vqa-raw", root, options={"min_count": "1"})
    meta = json.loads((root / "vqav2" / "meta.json").read_text())  # one answer longer than a word, as
    meta["targets"]["answers"].append("red and white striped")  # the real answer list has
    (root / "vqav2" / "meta.json").write_text(json.dumps(meta))
    return root


def _micro(seed: int = 0, **overrides: Any):
    """A seeded micro model whose blocks and temperatures all matter (LayerScale 1, distinct scales)."""
    torch.manual_seed(seed)
    model = build_model("tiny", **{**MICRO, **overrides}).eval()
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.gamma_1.fill_(1.0)
            block.gamma_2.fill_(1.0)
        for i, p in enumerate(model.head.logit_scales.values()):
            p.fill_(1.0 + 0.25 * i)
    return model


@pytest.fixture(scope="module")
def model():
    return _micro()


def digest(value: Any) -> str:
    """One hash of nested tensors / arrays / containers / scalars (equal values, equal digest)."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.float().numpy().round(5).tobytes() if t.is_floating_point() else t.numpy().tobytes())
        elif isinstance(v, np.ndarray):
            walk(torch.as_tensor(v))
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for x in v:
                walk(x)
        else:
            h.update(repr(round(v, 5) if isinstance(v, float) else v).encode())

    walk(value)
    return h.hexdigest()


def _outcome(fn: Callable[[], Any]) -> Any:
    """The value, or the refusal (a clear error is an observable effect too)."""
    try:
        return fn()
    except UpctlError as exc:
        return f"refused: {type(exc).__name__}: {exc}"


# -- recipe keys -----------------------------------------------------------------------------------------


def _recipe(key: str, value: Any, probe: Rec, data: Path, tmp: Path) -> Recipe:
    base = {"name": "keys", "model": {"size": "tiny", "overrides": dict(MICRO)},
            "tasks": [{"name": "mini-faces", "batch_size": 4}], "optim": {"warmup_steps": 1},
            "train": {"max_steps": 2, "ckpt_every": 0, "log_every": 1}, "data_dir": str(data)}
    if value == "<checkpoint>":
        value = str(save_model(_micro(seed=7), tmp / "start"))
    elif value == "<data>":
        value = str(data)
    elif value == "<empty>":
        (tmp / "empty").mkdir(exist_ok=True)
        value = str(tmp / "empty")
    dotted = key.replace("[]", ".0")
    return recipe_from_dict(base, [*probe.extra, f"{dotted}={json.dumps(value)}"])


def _run(recipe: Recipe, out: Path) -> Any:
    res = train(recipe, output=out, device="cpu", handle_sigterm=False, log=lambda _m: None)
    ckpts = sorted(p.name for p in (out / CKPT_DIR).iterdir()) if (out / CKPT_DIR).is_dir() else []
    return (res.step, [(s, t, round(l, 5)) for s, t, l in res.history], ckpts,
            len(read_metrics(out)), res.evals, digest(res.model.state_dict()))


def _optimizer(recipe: Recipe) -> Any:
    opt = build_optimizer(_micro(), recipe.optim)
    sched = build_scheduler(opt, recipe.optim, recipe.train.max_steps)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    lrs = []
    for _ in range(recipe.train.max_steps + 2):
        lrs.append([g["lr"] for g in opt.param_groups])
        sched.step()
    return groups, lrs


def _model(recipe: Recipe) -> Any:
    torch.manual_seed(0)
    m = build_training_model(recipe)
    info = setup_tuning(m, recipe.tune.mode)
    return dataclasses.asdict(m.cfg), info.trainable, digest(m.state_dict())


def _training_tasks(recipe: Recipe) -> Any:
    tasks, examples = build_training_tasks(recipe, _micro().cfg, None, DistEnv())
    return [(t.cfg.name, type(t).__name__, t.dataset.name, t.opts.to_dict(), [str(e["id"]) for e in ex])
            for t, ex in zip(tasks, examples)]


def _run_gathering(recipe: Recipe) -> list[bool]:
    """Whether each (retrieval) task gathers features across ranks, as two ranks would build it."""
    tasks, _ = build_training_tasks(recipe, _micro().cfg, None, DistEnv(world_size=2))
    return [t.gather for t in tasks]


def _evaluation(recipe: Recipe, model: Any) -> Any:
    tasks, _ = build_training_tasks(recipe, model.cfg, None, DistEnv())
    return {name: (r.split, r.num_samples) for name, r in evaluate_tasks(model, tasks, recipe.eval).items()}


def _summary(recipe: Recipe, tmp: Path) -> str:
    path = tmp / "shown.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    return res.output.replace(str(path), "")


def _observe_recipe(name: str, recipe: Recipe, model: Any, tmp: Path) -> Any:
    observers: dict[str, Callable[[], Any]] = {
        "run": lambda: _run(recipe, tmp / "run"),
        "optimizer": lambda: _optimizer(recipe),
        "model": lambda: _model(recipe),
        "training_tasks": lambda: _training_tasks(recipe),
        "gathering": lambda: _run_gathering(recipe),
        "evaluation": lambda: _evaluation(recipe, model),
        "stages": lambda: [(n, recipe_to_dict(r)) for n, r in expand_stages(recipe)],
        "preflight": lambda: preflight(recipe, None),
        "summary": lambda: _summary(recipe, tmp),
        "label": lambda: run_label(recipe),
    }
    return _outcome(observers[name])


_RECIPE_CASES = [(k, p) for k, p in RECIPE_PROBES.items() if isinstance(p, Rec)]


@pytest.mark.parametrize("key,probe", _RECIPE_CASES, ids=[k for k, _ in _RECIPE_CASES])
def test_recipe_key_changes_what_is_built_or_trained(key, probe, data, model, tmp_path):
    def observe(i: int, value: Any) -> Any:
        tmp = tmp_path / str(i)
        tmp.mkdir()
        return _observe_recipe(probe.observe, _recipe(key, value, probe, data, tmp), model, tmp)

    seen = [_outcome(lambda: observe(0, probe.a)), _outcome(lambda: observe(1, probe.b))]
    assert seen[0] != seen[1], f"{key}: {probe.a!r} and {probe.b!r} gave the same {probe.observe}: {seen[0]!r}"[:2000]


# -- task options ----------------------------------------------------------------------------------------


def _task(family: str, probe: Opt, key: str, value: Any, data: Path, model: Any):
    name = probe.task or FAMILY_TASK[family]
    base = task_config(name)
    own = family_options(family).keys()  # another family's task: keep the options both families have
    options = {**{k: v for k, v in base.options.items() if k in own}, **probe.extra, key: value}
    cfg = TaskConfig(**{**dataclasses.asdict(base), "family": family, "options": options})
    return build_task(cfg, data, model.cfg)


def _items(task, split: str, train: bool, n: int) -> dict:
    rows = task.examples(split)[:n]
    items = [task.load(s, train=train, rng=np.random.default_rng([1, i])) for i, s in enumerate(rows)]
    return task.collate(items, train=train, rng=np.random.default_rng(2))


def _loss(task, model) -> float:
    batch = _items(task, task.cfg.split, True, 4)
    ts = task.training_target_set(np.random.default_rng(3))
    with torch.no_grad():
        targets = task.encode_target_set(model, ts) if ts is not None else None
        loss, _ = task.loss(model, batch, targets)
    return round(float(loss), 5)


def _predict(task, model) -> Any:
    batch = _items(task, task.cfg.eval_split, False, 3)
    with torch.no_grad():
        return task.evaluate_batch(model, batch, target_features(model, task))


def _metrics(task) -> Any:
    rows = task.examples(task.cfg.eval_split)[:3]
    preds = [{"id": str(s["id"]), "caption": s["texts"][0], "references": s["texts"]} for s in rows]
    return sorted(task.compute_metrics(preds))


def _gathering(task) -> bool:
    task.set_feature_gathering(False)
    return task.gather


def _observe_task(name: str, task, model) -> Any:
    ts = None if name != "targets" else task.target_set()
    observers: dict[str, Callable[[], Any]] = {
        "train_batch": lambda: digest(_items(task, task.cfg.split, True, 8)),
        "eval_batch": lambda: digest(_items(task, task.cfg.eval_split, False, 1)),
        "loss": lambda: _loss(task, model),
        "predict": lambda: digest(_predict(task, model)),
        "targets": lambda: digest((ts.labels, ts.ids)) if ts is not None else None,
        "metrics": lambda: _metrics(task),
        "eval_batch_size": lambda: task.eval_batch_size,
        "gathering": lambda: _gathering(task),
    }
    return _outcome(observers[name])


_OPTION_CASES = [(f, k, p) for f, table in OPTION_PROBES.items() for k, p in table.items() if not isinstance(p, Elsewhere)]


@pytest.mark.parametrize("family,key,probe", _OPTION_CASES, ids=[f"{f}.{k}" for f, k, _ in _OPTION_CASES])
def test_task_option_changes_what_the_task_does(family, key, probe, data, model):
    if isinstance(probe, Refused):
        with pytest.raises(FieldError) as info:
            family_options(family).from_mapping({key: probe.value}, "tasks[0].options")
        assert str(info.value).startswith(f"tasks[0].options.{key}: ") and probe.fragment in str(info.value)
        assert "\n" not in str(info.value)
        return
    seen = [_observe_task(probe.observe, _task(family, probe, key, v, data, model), model) for v in (probe.a, probe.b)]
    assert seen[0] != seen[1], f"{family}.{key}: {probe.a!r} and {probe.b!r} gave the same {probe.observe}: {seen[0]!r}"
