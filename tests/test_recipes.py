"""Recipes: every shipped recipe validates, overrides work, each mistake is one clear line.

Like litgpt's test_config_hub: the whole recipes/ folder is loaded and checked in CI, so a
shipped recipe can never rot silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from uniperceiver.config import (
    STAGE_DEFAULTS,
    ConfigError,
    Recipe,
    expand_stages,
    list_recipes,
    load_recipe,
    recipe_for_task,
    recipe_from_dict,
    recipe_to_dict,
    recipes_dir,
    save_recipe,
)
from uniperceiver.config import loading as loading_module
from uniperceiver.config import schema as schema_module
from upctl.main import app

ROOT = recipes_dir()
SHIPPED = list_recipes()
DOWNSTREAM = [
    "imagenet", "kinetics400", "coco-caption", "coco-retrieval", "flickr30k-caption", "flickr30k-retrieval",
    "msvd-caption", "msvd-retrieval", "msrvtt-caption", "msrvtt-retrieval", "vqav2", "glue-cola", "glue-sst2",
    "glue-mrpc", "glue-qqp", "glue-stsb", "glue-mnli", "glue-qnli", "glue-rte", "glue-wnli",
]
# The reference mixture (facts sheet + reference stage-1 config): name -> (batch, sample weight, loss weight).
DATASET_WEIGHTS = {"yfcc": 0.584, "cc12m": 0.5057, "cc3m": 0.26295, "vg": 0.1766, "coco": 0.1144, "sbu": 0.1383}
MIXTURE = {
    "imagenet21k": (720, 2.486, 1.0), "kinetics700": (64, 0.76, 0.1), "mit": (112, 0.44, 0.1),
    "bookswiki-mlm": (512, 2.75, 0.5),
    **{f"{d}-pt-caption": (300, w, 1.0) for d, w in DATASET_WEIGHTS.items()},
    **{f"{d}-pt-retrieval": (512, w, 0.5) for d, w in DATASET_WEIGHTS.items()},
}
# The demo holds digit CLASSIFICATION out too (digits appear in pre-training only as image-caption pairs).
HELD_OUT = {"mini-digits", "mini-faces", "mini-video-retrieval", "mini-sentiment"}


def _catalog():
    return pytest.importorskip("uniperceiver.tasks.catalog")


def test_recipes_folder_is_found() -> None:
    assert (ROOT / "base.yaml").is_file()
    assert len(SHIPPED) >= 6 + 2 * len(DOWNSTREAM)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates_and_round_trips(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name and recipe.description and recipe.tasks
    assert [name for name, _ in expand_stages(recipe)]  # every stage builds
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    out = tmp_path / "saved.yaml"
    save_recipe(recipe, out)
    assert load_recipe(out) == recipe
    assert [p.name for p in tmp_path.iterdir()] == ["saved.yaml"]  # atomic: no temp file left


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_tasks_are_catalog_tasks(path: Path) -> None:
    catalog = _catalog()
    raw = yaml.safe_load(path.read_text())
    for entry in raw["tasks"]:
        spec = catalog.CATALOG[entry["name"]]  # canonical names, no aliases in shipped files
        assert entry.get("family", spec.family) == spec.family
        assert entry.get("dataset", spec.dataset) == spec.dataset


@pytest.mark.parametrize("task", DOWNSTREAM)
def test_every_downstream_task_has_prompt_and_finetune_recipes(task: str) -> None:
    prompt = load_recipe(ROOT / "prompt" / f"{task}.yaml")
    finetune = load_recipe(ROOT / "finetune" / f"{task}.yaml")
    assert [t.name for t in prompt.tasks] == [task] == [t.name for t in finetune.tasks]
    assert prompt.stage == "prompt_tune" and finetune.stage == "finetune"
    assert (prompt.tune.mode, prompt.tune.prompt_tokens, prompt.tune.fraction) == ("prompt", 10, 0.01)
    assert prompt.optim.weight_decay == 0.0 and prompt.model.overrides["spe_bias"] is True
    assert finetune.tune.mode == "full" and finetune.tune.fraction is None
    assert finetune.model.overrides["drop_path"] in (0.1, 0.2)


def test_reference_downstream_hyper_parameters() -> None:
    p = {t: load_recipe(ROOT / "prompt" / f"{t}.yaml") for t in ("imagenet", "coco-caption", "coco-retrieval")}
    assert (p["imagenet"].optim.lr, p["imagenet"].train.max_steps) == (1e-4, 2500)
    assert p["imagenet"].model.overrides["cls_head_classes"] == 1000  # the fc head, ImageNet only
    assert "cls_head_classes" not in p["coco-caption"].model.overrides
    assert (p["coco-caption"].optim.lr, p["coco-caption"].train.max_steps) == (1e-3, 1000)
    assert (p["coco-retrieval"].optim.lr, p["coco-retrieval"].train.max_steps) == (1e-3, 500)
    f = {t: load_recipe(ROOT / "finetune" / f"{t}.yaml") for t in ("imagenet", "coco-caption", "vqav2")}
    im = f["imagenet"]
    assert (im.optim.lr, im.train.max_steps, im.tasks[0].batch_size, im.optim.betas) == (2e-5, 20000, 128, (0.9, 0.999))
    assert im.tasks[0].options["label_smoothing"] == 0.1
    assert (f["coco-caption"].optim.lr, f["coco-caption"].train.max_steps) == (2e-5, 10000)
    vqa = f["vqav2"]
    assert (vqa.optim.lr, vqa.train.max_steps, vqa.tasks[0].options["fixed_temperature"]) == (4e-5, 20000, 0.03)


def test_base_recipe_is_the_reference_mixture() -> None:
    recipe = load_recipe(ROOT / "base.yaml")
    got = {t.name: (t.batch_size, t.sample_weight, t.loss_weight) for t in recipe.tasks}
    assert got == MIXTURE
    assert math.isclose(sum(t.sample_weight for t in recipe.tasks), 10.0, abs_tol=1e-3)
    tasks = {t.name: t for t in recipe.tasks}
    assert tasks["kinetics700"].options["frames"] == 4 and tasks["kinetics700"].options["stride"] == 32
    assert tasks["mit"].options["frames"] == 3
    assert tasks["imagenet21k"].options["mixup"] == 0.8 and tasks["imagenet21k"].options["cutmix"] == 1.0
    o = recipe.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad, o.warmup_steps, o.min_lr, o.schedule) == (
        1e-3, (0.9, 0.95), 1e-6, 0.2, 0.1, 10000, 1e-6, "cosine")
    assert recipe.model.size == "base" and recipe.model.overrides == {"image_size": 160, "drop_path": 0.1}
    assert (recipe.train.max_steps, recipe.train.precision) == (200000, "auto")

    (n1, s1), (n2, s2) = expand_stages(recipe)
    assert s1 == dataclasses.replace(recipe, stages=[])
    assert n2 == "stage2-224px" and not s2.stages
    t2 = {t.name: t for t in s2.tasks}
    assert s2.model.overrides["image_size"] == 224 and s2.train.max_steps == 45000
    assert (s2.optim.lr, s2.optim.weight_decay) == (2e-5, 0.05)
    assert t2["imagenet21k"].batch_size == 440 and t2["imagenet21k"].options["mixup"] == 0.0
    assert (t2["kinetics700"].batch_size, t2["kinetics700"].options["frames"]) == (12, 8)
    assert {t2[f"{d}-pt-caption"].batch_size for d in DATASET_WEIGHTS} == {200}
    assert {t2[f"{d}-pt-retrieval"].batch_size for d in DATASET_WEIGHTS} == {320}


def test_large_recipe_is_base_with_size_large_and_fsdp() -> None:
    base, large = (recipe_to_dict(load_recipe(ROOT / f)) for f in ("base.yaml", "large.yaml"))
    assert large["model"]["size"] == "large"
    for d in (base, large):
        d.pop("name"), d.pop("description"), d["model"].pop("size")
    assert large["train"].pop("sharding") == "fsdp" and base["train"].pop("sharding") == "ddp"
    assert base == large


def test_tiny_and_mini_recipes() -> None:
    tiny = load_recipe(ROOT / "tiny.yaml")
    assert tiny.model.size == "tiny" and tiny.train.max_steps <= 100
    assert [t.name for t in tiny.tasks] == [
        "mini-digits", "mini-photos-retrieval", "mini-photos-caption", "mini-video", "mini-news-mlm"]
    assert {t.options["vocab"] for t in tiny.tasks if t.family in ("caption", "mlm")} == {"corpus"}
    mini = load_recipe(ROOT / "mini" / "pretrain.yaml")
    names = {t.name for t in mini.tasks}
    assert not names & HELD_OUT
    assert {"video_cls", "retrieval", "caption", "mlm"} <= {t.family for t in mini.tasks}
    catalog = _catalog()
    assert not [n for n in names if catalog.CATALOG[n].held_out]
    for name in ("prompt", "finetune"):
        assert load_recipe(ROOT / "mini" / f"{name}.yaml").model.size == "tiny"


# -- overrides ----------------------------------------------------------------------------------------


def test_overrides_by_key_index_and_name() -> None:
    r = load_recipe(ROOT / "tiny.yaml", [
        "optim.lr=0.1", "tasks.0.batch_size=2", "tasks.mini-video.batch_size=3", "tasks.mini-video.options.frames=2",
        "optim.betas=[0.8, 0.9]", "optim.min_lr=1e-7", "model.overrides.image_size=32", "model.checkpoint=runs/x",
        "train.compile=true", "tune.fraction=null",
    ])
    tasks = {t.name: t for t in r.tasks}
    assert r.optim.lr == 0.1 and r.optim.betas == (0.8, 0.9)
    assert r.optim.min_lr == 1e-7  # "1e-7" is a string to PyYAML; accepted for a float field
    assert tasks["mini-digits"].batch_size == 2
    assert tasks["mini-video"].batch_size == 3 and tasks["mini-video"].options["frames"] == 2
    assert r.model.overrides["image_size"] == 32 and r.model.checkpoint == "runs/x" and r.train.compile is True
    assert load_recipe(ROOT / "tiny.yaml").optim.lr == 1e-3  # the file itself is untouched


def test_override_by_alias_and_stage() -> None:
    _catalog()
    r = load_recipe(ROOT / "tiny.yaml", ["tasks.mini-mlm.batch_size=5"])  # alias of mini-news-mlm
    assert r.tasks[-1].name == "mini-news-mlm" and r.tasks[-1].batch_size == 5
    base = load_recipe(ROOT / "base.yaml", ["stages.stage2-224px.set.optim.lr=1e-5"])
    assert [s.optim.lr for _, s in expand_stages(base)] == [1e-3, 1e-5]
    # The user's --set wins over a stage's own settings when passed again to expand_stages.
    assert [s.optim.lr for _, s in expand_stages(base, ["optim.lr=3e-5"])] == [3e-5, 3e-5]


# -- errors: one line naming the file, the key and what is allowed ----------------------------------------

MINIMAL = {
    "name": "t",
    "model": {"size": "tiny"},
    "tasks": [{"name": "custom-digits", "family": "image_cls", "dataset": "mini-digits", "batch_size": 4},
              {"name": "custom-video", "family": "video_cls", "dataset": "mini-video"}],
}


def _write(tmp_path: Path, data: object, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _edit(**changes: object) -> dict:
    data = json.loads(json.dumps(MINIMAL))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[int(last) if last.isdigit() else last] = value
    return data


ERRORS = {
    "unknown-key": (_edit(optim__lrr=0.1), ["optim.lrr", "unknown key", "did you mean 'lr'", "allowed: lr, betas"]),
    "unknown-top-key": (_edit(taks=[]), ["taks", "did you mean 'tasks'", "allowed: name, stage"]),
    "wrong-type": (_edit(train__max_steps="many"), ["train.max_steps", "expected an integer", "'many'"]),
    "bool-for-int": (_edit(train__seed=True), ["train.seed", "expected an integer"]),
    "not-allowed": (_edit(train__precision="fp8"), ["train.precision", "'fp8'", "allowed: auto, fp32, bf16, fp16"]),
    "negative-batch": (_edit(tasks__1__batch_size=-4), ["tasks[1].batch_size", "must be > 0", "-4"]),
    "negative-weight": (_edit(tasks__0__sample_weight=-1), ["tasks[0].sample_weight", "must be >= 0"]),
    "size": (_edit(model__size="huge"), ["model.size", "'huge'", "allowed: tiny, small, base, large"]),
    "model-override": (_edit(model__overrides={"img_size": 64}), ["model.overrides.img_size", "did you mean 'image_size'"]),
    "model-value": (_edit(model__overrides={"image_size": 60}), ["model.overrides", "multiple of", "patch_size"]),
    "family": (_edit(tasks__0__family="captioning"), ["tasks[0].family", "did you mean 'caption'", "allowed: image_cls"]),
    "task-name": (_edit(tasks__0={"name": "mini-digit"}), ["tasks[0].name", "'mini-digit'", "family and dataset"]),
    "task-key": (_edit(tasks__0__batchsize=4), ["tasks[0].batchsize", "did you mean 'batch_size'"]),
    "duplicate-task": (_edit(tasks__1__name="custom-digits"), ["tasks[1].name", "duplicate task"]),
    "option": (_edit(tasks__0__family="caption", tasks__0__options={"vocab": "small"}),
               ["tasks[0].options.vocab", "allowed: full, corpus"]),
    "option-key": (_edit(tasks__0__options={"hflp": False}), ["tasks[0].options.hflp", "did you mean 'hflip'"]),
    "option-of-other-family": (_edit(tasks__0__options={"vocab": "full"}), ["tasks[0].options.vocab", "unknown option"]),
    "no-tasks": (_edit(tasks=[]), ["tasks", "non-empty list"]),
    "tune-mode": (_edit(stage="finetune", tune={"mode": "prompt"}), ["tune.mode", "prompt_tune"]),
    "betas": (_edit(optim__betas=[0.9, 1.5]), ["optim.betas[1]", "must be >= 0 and < 1", "1.5"]),
    "min-lr": (_edit(optim={"lr": 1e-4, "min_lr": 1e-3}), ["optim.min_lr", "above optim.lr"]),
    "stage-value": (_edit(stages=[{"name": "s2", "set": {"optim.lr": -1}}]), ["stage 's2'", "optim.lr", "must be > 0"]),
    "stage-key": (_edit(stages=[{"name": "s2", "set": {"optim.lrr": 1}}]), ["stage 's2'", "optim.lrr", "did you mean 'lr'"]),
    "yaml-duplicate": ("name: t\noptim:\n  lr: 0.1\n  lr: 0.2\n", ["line 4", "duplicate key 'lr'", "first at line 3"]),
    "yaml-syntax": ("name: t\ntasks: [a, b\n", ["invalid YAML at line"]),
    "not-a-mapping": ("- just\n- a list\n", ["must be a mapping"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_names_file_key_and_allowed(case: str, tmp_path: Path) -> None:
    data, expected = ERRORS[case]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_minimal_recipe_is_valid(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, MINIMAL))
    assert isinstance(r, Recipe) and [t.split for t in r.tasks] == ["train", "train"]


def test_catalog_task_defaults_and_family_check(tmp_path: Path) -> None:
    catalog = _catalog()
    r = load_recipe(_write(tmp_path, _edit(tasks=["coco", {"name": "mini-video", "options": {"frames": 2}}])))
    assert r.tasks[0].name == "coco-caption"  # alias resolved
    assert r.tasks[0] == catalog.task_config("coco-caption")
    assert r.tasks[1].options["frames"] == 2 and r.tasks[1].options["stride"] == catalog.task_config("mini-video").options["stride"]
    bad = _write(tmp_path, _edit(tasks=[{"name": "coco-caption", "family": "retrieval"}]), "bad.yaml")
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.family: 'retrieval' contradicts catalog task 'coco-caption'"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="did you mean 'mini-digits'"):
        load_recipe(_write(tmp_path, _edit(tasks=["mini-digit"]), "typo.yaml"))


OVERRIDE_ERRORS = {
    "optim.lrr=1": ["--set optim.lrr=1", "did you mean 'lr'", "allowed: lr"],
    "optim.lr": ["expected KEY=VALUE"],
    "tasks.9.batch_size=1": ["tasks.9", "index out of range", "0..4"],
    "tasks.mini-digts.batch_size=1": ["no entry named 'mini-digts'", "did you mean 'mini-digits'"],
    "tasks.0.batch=1": ["tasks[0].batch", "did you mean 'batch_size'"],
    "optim.lr.x=1": ["optim.lr", "single value"],
    "tasks.0.batch_size=-1": ["tasks[0].batch_size", "must be > 0", "(from --set tasks.0.batch_size=-1)"],
    "optim.lr=abc": ["optim.lr", "expected a number", "(from --set optim.lr=abc)"],
    "optim.betas=[0.9": ["--set optim.betas=[0.9", "invalid YAML"],
}


@pytest.mark.parametrize("text", list(OVERRIDE_ERRORS))
def test_override_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(ROOT / "tiny.yaml", [text])
    msg = str(info.value)
    assert "\n" not in msg
    for part in OVERRIDE_ERRORS[text]:
        assert part in msg, (part, msg)


def test_unsafe_yaml_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path, f'name: !!python/object/apply:os.system ["touch {marker}"]\ntasks: [mini-digits]\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert "line 1" in str(info.value) and "refused" in str(info.value) and "python/object/apply" in str(info.value)
    with pytest.raises(ConfigError, match="refused"):
        load_recipe(ROOT / "tiny.yaml", [f'name=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()
    for module in (loading_module, schema_module):  # plain YAML only, by construction
        source = Path(module.__file__).read_text()
        assert "yaml.load(" not in source and "unsafe_load" not in source and "FullLoader" not in source


# -- per-task recipes --------------------------------------------------------------------------------------


def test_recipe_for_task() -> None:
    _catalog()
    assert recipe_for_task("imagenet", "prompt_tune") == load_recipe(ROOT / "prompt" / "imagenet.yaml")
    assert recipe_for_task("coco", "finetune").tasks[0].name == "coco-caption"  # alias, shipped file
    assert recipe_for_task("imagenet", "finetune", ["optim.lr=1e-5"]).optim.lr == 1e-5
    mini = recipe_for_task("mini-sentiment", "prompt")  # no shipped file: the mini template
    assert (mini.stage, mini.model.size, mini.tasks[0].name, mini.tasks[0].family) == (
        "prompt_tune", "tiny", "mini-sentiment", "glue")
    assert mini.tune.mode == "prompt"
    default = recipe_for_task("coco-pt-caption", "finetune")  # no shipped file, not mini: stage defaults
    assert default.optim.lr == STAGE_DEFAULTS["finetune"]["optim"]["lr"] and default.tasks[0].dataset == "coco"
    with pytest.raises(ConfigError, match="did you mean 'imagenet'"):
        recipe_for_task("imagenett", "finetune")
    with pytest.raises(ConfigError, match="allowed: prompt_tune, finetune"):
        recipe_for_task("imagenet", "pretrain")


# -- the command line ------------------------------------------------------------------------------------------

runner = CliRunner()
ENV = {"COLUMNS": "200", "UPCTL_DEBUG": "0"}


def test_cli_validate_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "resolved.json"
    result = runner.invoke(app, ["validate", str(ROOT / "tiny.yaml"), "--set", "tasks.mini-digits.batch_size=4",
                                 "--json", str(out)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "tiny (pretrain)" in result.output and "mini-news-mlm" in result.output and "valid" in result.output
    saved = json.loads(out.read_text())
    assert saved["tasks"][0]["batch_size"] == 4 and saved["model"]["size"] == "tiny"
    shown = runner.invoke(app, ["validate", "mini/pretrain", "--yaml"], env=ENV)  # a shipped name
    assert shown.exit_code == 0 and "optim:" in shown.output


def test_cli_validate_shows_only_the_options_that_differ_from_the_family_defaults() -> None:
    """A resolved task holds every option; the summary lists only the changed ones, whether the
    catalog, the recipe or `--set` changed them (a value equal to the default is not a change)."""
    result = runner.invoke(app, ["validate", str(ROOT / "tiny.yaml"),
                                 "--set", "tasks.mini-photos-retrieval.options.max_len=40",
                                 "--set", "tasks.mini-video.options.sampling=stride"], env=ENV)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in result.output.splitlines()
            if line.count("│") == 8}
    assert rows["mini-video"] == "frames=4, stride=8, views=[1, 1]", rows
    assert rows["mini-digits"] == "hflip=False, crop_scale=[0.6, 1.0]", rows
    assert rows["mini-photos-retrieval"] == "max_len=40", rows
    recipe = load_recipe(ROOT / "tiny.yaml")
    assert next(t for t in recipe.tasks if t.name == "mini-video").options["sampling"] == "stride"  # stored complete


def test_cli_validate_error_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, _edit(tasks__1__batch_size=-4))
    result = runner.invoke(app, ["validate", str(path)], env=ENV)
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tasks[1].batch_size" in lines[0] and str(path) in lines[0], result.output
    assert "Traceback" not in result.output
    bad_set = runner.invoke(app, ["validate", str(ROOT / "tiny.yaml"), "--set", "optim.lrr=1"], env=ENV)
    assert bad_set.exit_code == 1 and "did you mean 'lr'" in bad_set.output


def test_cli_recipes_lists_shipped_recipes() -> None:
    result = runner.invoke(app, ["recipes"], env=ENV)
    assert result.exit_code == 0, result.output
    for rel in ("base.yaml", "tiny.yaml", "mini/pretrain.yaml", "prompt/imagenet.yaml", "finetune/vqav2.yaml"):
        assert rel in result.output
    base_row = next(ln for ln in result.output.splitlines() if "base.yaml" in ln and "mini" not in ln)
    assert "pretrain" in base_row and "base" in base_row and "16" in base_row
    only = runner.invoke(app, ["recipes", "--stage", "finetune"], env=ENV)
    assert only.exit_code == 0 and "finetune/imagenet.yaml" in only.output and "base.yaml" not in only.output
    assert runner.invoke(app, ["recipes", "--stage", "train"], env=ENV).exit_code == 1


def test_cli_recipes_reports_broken_recipe(tmp_path: Path) -> None:
    _write(tmp_path, MINIMAL, "good.yaml")
    _write(tmp_path, _edit(train__precision="fp8"), "broken.yaml")
    result = runner.invoke(app, ["recipes", "--dir", str(tmp_path)], env=ENV)
    assert result.exit_code == 1
    assert "good.yaml" in result.output and "train.precision" in result.output and "1 recipe(s)" in result.output


@pytest.mark.parametrize("command", ["validate", "recipes"])
def test_cli_help_has_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env=ENV)
    assert result.exit_code == 0 and "Examples" in result.output and "upctl" in result.output
