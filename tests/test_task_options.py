"""Typed task options: one dataclass per family holds each option's type, default and check.

Every family rejects a wrong type and an out-of-range value with one line naming the key; an
unknown key gets a "did you mean"; every catalog task's options round-trip through its family's
dataclass, and the catalog states only what differs from the defaults; the mini tasks build on the
real mini data; the `KEY=VALUE` parser has one syntax.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uniperceiver.config import load_recipe, override_task_options, parse_key_values, parse_overrides, recipes_dir
from uniperceiver.data.format import prepare_dataset
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks import CATALOG, FAMILIES, build_task, task_config
from uniperceiver.tasks.catalog import family_class, family_options
from uniperceiver.tasks.custom import CustomOptions, CustomTask
from uniperceiver.tasks.options import FieldError, TaskOptions

ALL_OPTIONS: dict[str, type[TaskOptions]] = {**{f: family_options(f) for f in FAMILIES}, "custom": CustomOptions}

#: family -> [(key, bad value, a fragment the message must hold)]: one wrong type, one out of range.
BAD = {
    "image_cls": [("mixup", "lots", "expected a number"), ("mixup_prob", 1.5, "<= 1"),
                  ("targets", "pictures", "allowed: names, images"), ("template", "a photo", "'{}'")],
    "video_cls": [("frames", 2.5, "expected an integer"), ("stride", 0, "> 0"), ("views", "4by3", "TxS")],
    "retrieval": [("gather_features", "yes", "true or false"), ("max_len", 1, ">= 2")],
    "caption": [("beam_size", "2", "expected an integer"), ("max_gen_len", 0, ">= 1"),
                ("vocab", "small", "allowed: full, corpus"), ("spice", "maybe", "'auto'"), ("views", [4, 3], "1x1")],
    "mlm": [("vocab", 3, "non-empty string"), ("mask_prob", 0.0, "> 0"), ("min_words", -1, ">= 1")],
    "vqa": [("fixed_temperature", "hot", "expected a number"), ("fixed_temperature", 0, "> 0"),
            ("train_transform", "crop", "allowed: reference, random_resized")],
    "glue": [("words", "no yes", "list"), ("max_len", 4, ">= 8"), ("glue_task", "squad", "not a GLUE task")],
    "custom": [("top_k", True, "expected an integer"), ("top_k", 0, ">= 1")],
}


def test_every_family_has_typed_frozen_options():
    assert set(BAD) == set(ALL_OPTIONS)
    for family, cls in ALL_OPTIONS.items():
        assert dataclasses.is_dataclass(cls) and issubclass(cls, TaskOptions), family
        opts = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            opts.eval_batch_size = 3  # type: ignore[misc]
        assert cls.from_mapping(opts.to_dict()) == opts  # defaults round-trip
    for family in FAMILIES:
        assert family_class(family).Options is ALL_OPTIONS[family]
    assert CustomTask.Options is CustomOptions
    with pytest.raises(ConfigError, match="unknown task family 'ocr'; known families: image_cls"):
        family_options("ocr")


#: Resolve every catalog task and load every shipped recipe, then list the modules that came with it.
_TORCH_FREE_PROBE = """
import sys
from uniperceiver.config import list_recipes, load_recipe
from uniperceiver.tasks import CATALOG, TaskConfig, task_config
from uniperceiver.tasks.catalog import changed_options, family_options
for name, spec in CATALOG.items():
    cfg = task_config(name)
    family_options(spec.family).from_mapping(cfg.options)
    assert changed_options(spec.family, cfg.options) == spec.defaults["options"], name
for path in list_recipes():
    load_recipe(path)
heavy = {"torch", "uniperceiver.tasks.base"} | {m for m in sys.modules if m.startswith("uniperceiver.tasks.")
                                                 and m.split(".")[-1] in ("classification", "captioning", "retrieval",
                                                                          "mlm", "vqa", "glue", "custom", "_vision_io")}
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_options_and_recipes_resolve_without_torch_or_the_family_modules():
    """The schema, the catalog and every option check run on the torch-free modules alone (`upctl
    validate` / `upctl tasks` start fast); a fresh interpreter, so no earlier import hides one."""
    proc = subprocess.run([sys.executable, "-c", _TORCH_FREE_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_task_config_is_one_class_wherever_it_is_imported():
    from uniperceiver import config
    from uniperceiver import tasks
    from uniperceiver.tasks import base, options

    assert base.TaskConfig is options.TaskConfig is tasks.TaskConfig is config.TaskConfig
    assert callable(tasks.task_config) and tasks.task_config("mini-digits").name == "mini-digits"
    with pytest.raises(AttributeError, match="has no attribute 'Taskk'"):
        tasks.Taskk  # noqa: B018


@pytest.mark.parametrize("family,key,value,fragment",
                         [(f, k, v, m) for f, cases in BAD.items() for k, v, m in cases],
                         ids=lambda x: str(x))
def test_bad_option_is_one_line_naming_key_value_and_expectation(family, key, value, fragment):
    cls = ALL_OPTIONS[family]
    with pytest.raises(ConfigError) as info:
        cls.from_mapping({key: value}, "tasks[2].options")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"tasks[2].options.{key}"), msg
    assert fragment in msg, (fragment, msg)
    assert repr(value) in msg or str(value) in msg, msg


@pytest.mark.parametrize("family", list(ALL_OPTIONS))
def test_unknown_option_gets_did_you_mean(family):
    cls = ALL_OPTIONS[family]
    key = cls.keys()[-1]
    typo = key[:-1] + ("x" if key[-1] != "x" else "y")
    with pytest.raises(FieldError) as info:
        cls.from_mapping({typo: 1}, "tasks[0].options")
    msg = str(info.value)
    assert msg.startswith(f"tasks[0].options.{typo}: unknown option") and f"did you mean {key!r}" in msg, msg
    assert "\n" not in msg


def test_model_checks_name_the_key():
    tiny = model_config("tiny")
    cases = [("image_cls", {"image_size": 60}, "image_size", "patch size"),
             ("video_cls", {"frames": 16}, "frames", "temporal table"),
             ("mlm", {"max_len": 1000}, "max_len", "text positions"),
             ("glue", {"scale": "txt_mlm"}, "scale", "did you mean 'text_mlm'")]
    for family, raw, key, fragment in cases:
        opts = family_options(family).from_mapping(raw)
        with pytest.raises(FieldError) as info:
            opts.check_model(tiny)
        assert info.value.key == key and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("name", list(CATALOG))
def test_every_catalog_task_resolves_and_round_trips(name):
    spec = CATALOG[name]
    cfg = task_config(name)
    cls = family_options(spec.family)
    opts = cls.from_mapping(cfg.options)
    assert set(cfg.options) == set(cls.keys())  # stored complete
    assert opts.to_dict() == cfg.options  # and they round-trip
    assert opts.changed() == spec.defaults["options"]  # the catalog states only what differs
    assert yaml.safe_load(yaml.safe_dump(cfg.options)) == cfg.options  # plain YAML data
    for size in ("tiny", "base"):
        opts.check_model(model_config(size))


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini-all")
    prepare_dataset("mini", None, root)
    return root


def test_every_mini_catalog_task_builds_with_its_typed_options(mini_data):
    tiny = model_config("tiny")
    names = [n for n, s in CATALOG.items() if s.kind == "mini"]
    assert len(names) >= 10
    for name in names:
        task = build_task(task_config(name), mini_data, tiny)
        assert isinstance(task.opts, family_options(task.cfg.family)), name
        assert task.opts.to_dict() == task.cfg.options, name
    digits = build_task(task_config("mini-digits"), mini_data, tiny)
    assert digits.vision.hflip is False and digits.vision.crop_scale == (0.6, 1.0)  # the catalog's values reach the task
    video = build_task(task_config("mini-video"), mini_data, tiny)
    assert (video.vision.frames, video.vision.stride, video.vision.views) == (4, 8, 1)


def test_recipe_options_are_checked_through_the_family_dataclass(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "tasks": [{"name": "mini-photos-caption", "options": {"beamsize": 3}}]}))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: tasks[0].options.beamsize: unknown option")
    assert "did you mean 'beam_size'" in str(info.value)
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.options\.frames: expected an integer, got 'many'"):
        load_recipe(recipes_dir() / "tiny.yaml", ["tasks.1.options.frames=many"])
    r = load_recipe(recipes_dir() / "tiny.yaml", ["tasks.mini-video.options.views=2x1"])
    assert next(t for t in r.tasks if t.name == "mini-video").options["views"] == [2, 1]


def test_one_key_value_parser():
    assert parse_key_values(["check=verify", " workers = 4 ", "mirror=http://x/?a=b"], "--option") == {
        "check": "verify", "workers": "4", "mirror": "http://x/?a=b"}
    assert parse_overrides(["beam_size=1", "views=[1, 1]", "spice=false", "limit="]) == {
        "beam_size": 1, "views": [1, 1], "spice": False, "limit": None}
    with pytest.raises(ConfigError, match=r"--option 'novalue': expected key=value"):
        parse_key_values(["novalue"], "--option")
    with pytest.raises(ConfigError, match=r"--set 'a=2': 'a' is given twice"):
        parse_overrides(["a=1", "a=2"])
    cfg = override_task_options(task_config("coco-caption"), ["beam_size=1", "length_penalty=0.5"])
    assert (cfg.options["beam_size"], cfg.options["length_penalty"]) == (1, 0.5)
    assert task_config("coco-caption").options["beam_size"] == 2
    with pytest.raises(ConfigError, match=r"options\.beamsize: unknown option.*did you mean 'beam_size'"):
        override_task_options(task_config("coco-caption"), ["beamsize=1"])
