"""The task catalog: names, aliases, defaults, build_task on the real mini data, and `upctl tasks`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniperceiver.data.format import prepare_dataset
from uniperceiver.errors import ConfigError, DataError
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks import ALIASES, CATALOG, FAMILIES, TaskConfig, build_task, resolve_task, task_config
from uniperceiver.tasks.catalog import TaskSpec, family_class, prepare_name
from uniperceiver.tasks.glue import GlueCloze
from uniperceiver.tasks.mlm import MaskedLM

DOWNSTREAM = ["imagenet", "kinetics400", "coco-caption", "coco-retrieval", "flickr30k-caption", "flickr30k-retrieval",
              "msvd-caption", "msvd-retrieval", "msrvtt-caption", "msrvtt-retrieval", "vqav2", "glue-cola", "glue-sst2",
              "glue-mrpc", "glue-qqp", "glue-stsb", "glue-mnli", "glue-qnli", "glue-rte", "glue-wnli"]
PRETRAIN = ["imagenet21k", "kinetics700", "mit", "bookswiki-mlm"] + [
    f"{d}-pt-{k}" for d in ("yfcc", "cc12m", "cc3m", "vg", "coco", "sbu") for k in ("caption", "retrieval")]
MINI = ["mini-digits", "mini-digits-retrieval", "mini-photos-caption", "mini-photos-retrieval", "mini-faces",
        "mini-video", "mini-video-retrieval", "mini-sentiment", "mini-news-mlm"]


def test_every_contract_name_is_in_the_catalog_and_resolves():
    for name in DOWNSTREAM + PRETRAIN + MINI:
        spec = resolve_task(name)
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert spec.family in FAMILIES
        cfg = task_config(name)
        assert isinstance(cfg, TaskConfig) and (cfg.name, cfg.family, cfg.dataset) == (name, spec.family, spec.dataset)
    assert set(DOWNSTREAM + PRETRAIN + MINI) <= set(CATALOG)


def test_families_are_module_class_strings():
    for family, target in FAMILIES.items():
        module, _, cls = target.partition(":")
        assert module.startswith("uniperceiver.tasks.") and cls.isidentifier()
    assert family_class("mlm") is MaskedLM and family_class("glue") is GlueCloze
    with pytest.raises(ConfigError, match="known families"):
        family_class("ocr")


def test_held_out_and_recipes():
    held = {n for n, s in CATALOG.items() if s.held_out}
    assert held == {"mini-faces", "mini-video-retrieval", "mini-sentiment"}
    for name in DOWNSTREAM + ["mini-digits", "mini-sentiment"]:
        s = CATALOG[name]
        assert s.prompt_recipe == f"recipes/prompt/{name}.yaml" and s.finetune_recipe == f"recipes/finetune/{name}.yaml"
    assert CATALOG["bookswiki-mlm"].prompt_recipe is None and CATALOG["yfcc-pt-caption"].finetune_recipe is None


def test_reference_defaults():
    opt = lambda n: task_config(n).options  # noqa: E731
    assert opt("bookswiki-mlm")["max_len"] == 128 and opt("mini-news-mlm")["max_len"] == 128
    assert opt("coco-pt-caption")["max_len"] == 50 and opt("coco-caption")["max_len"] == 30
    assert opt("coco-caption")["max_gen_len"] == 21 and opt("coco-caption")["beam_size"] == 2
    # Zero-shot captioning decodes with length penalty 2.0 (reference zeroshot_config/*_caption.yaml);
    # pre-training captions keep 0.0; the prompt / fine-tune recipes state their own 0.0.
    for name in ("coco-caption", "flickr30k-caption", "msvd-caption", "msrvtt-caption"):
        assert opt(name)["length_penalty"] == 2.0, name
    assert opt("coco-pt-caption")["length_penalty"] == 0.0
    # Zero-shot video retrieval cuts captions at 77 tokens (zeroshot_config/msvd_retrieval.yaml).
    assert opt("msvd-retrieval")["max_len"] == 77 and opt("msrvtt-retrieval")["max_len"] == 77
    assert opt("coco-retrieval")["max_len"] == 30
    assert opt("glue-sst2")["max_len"] == 256 and opt("vqav2")["max_len"] == 23
    assert (opt("kinetics400")["frames"], opt("kinetics400")["views"]) == (8, [4, 3])
    for name, s in CATALOG.items():
        vocab = s.defaults["options"].get("vocab")
        if vocab is not None:
            assert vocab == ("corpus" if s.kind == "mini" else "full"), name
    pt = task_config("imagenet21k")
    assert (pt.batch_size, pt.sample_weight, pt.loss_weight) == (720, 2.486, 1.0)
    assert task_config("bookswiki-mlm").sample_weight == 2.75
    assert task_config("yfcc-pt-caption").sample_weight == 0.584


def test_aliases_and_normalisation():
    expected = {"msvd": "msvd-caption", "vqa": "vqav2", "coco": "coco-caption", "flickr30k": "flickr30k-caption",
                "msrvtt": "msrvtt-caption", "kinetics": "kinetics400", "glue-sst-2": "glue-sst2"}
    for alias, target in expected.items():
        assert ALIASES[alias] == target and resolve_task(alias).name == target
    assert resolve_task("MSVD").name == "msvd-caption"
    assert resolve_task("mini_news_mlm").name == "mini-news-mlm"
    assert resolve_task("mini-mlm").name == "mini-news-mlm"  # the name mini-news's meta.json lists
    assert all(t in CATALOG for t in ALIASES.values())


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError) as err:
        resolve_task("coco-captoin")
    msg = str(err.value)
    assert "unknown task 'coco-captoin'" in msg and "did you mean coco-caption" in msg
    # the rest of the catalog is `upctl tasks`' job: the whole list (~2,000 characters) buried the suggestion
    assert f"`upctl tasks` lists all {len(CATALOG)} tasks" in msg and len(msg) < 200


def test_task_config_overrides():
    cfg = task_config("coco-caption", batch_size=4, beam_size=3, options={"max_len": 20})
    assert cfg.batch_size == 4 and cfg.options["beam_size"] == 3 and cfg.options["max_len"] == 20
    assert cfg.options["max_gen_len"] == 21  # untouched defaults survive
    assert task_config("coco-caption").options["beam_size"] == 2  # the catalog is not mutated
    assert task_config("vqav2", dataset="vqav2-small").dataset == "vqav2-small"
    with pytest.raises(ConfigError, match="cannot be overridden"):
        task_config("vqav2", family="glue")


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("mini-catalog")
    prepare_dataset("mini", None, data, options={"only": "news,sentiment"})
    return data


def test_build_task_on_mini_data(mini_dir):
    mcfg = model_config("tiny")
    mlm = build_task(task_config("mini-news-mlm"), mini_dir, mcfg)
    assert isinstance(mlm, MaskedLM) and mlm.dataset.name == "mini-news" and mlm.scale == "text_mlm"
    glue = build_task(task_config("mini-sentiment"), mini_dir, mcfg)
    # the reference GLUE configs use the text_mlm temperature; the family default stays "downstream"
    assert isinstance(glue, GlueCloze) and glue.key == "sst2" and glue.scale == "text_mlm"
    plain = TaskConfig("sentiment", "glue", "mini-sentiment", options={"glue_task": "sst2"})
    assert build_task(plain, mini_dir, mcfg).scale == "downstream"
    with pytest.raises(ConfigError, match="scale"):
        build_task(task_config("mini-sentiment", scale="nope"), mini_dir, mcfg)
    with pytest.raises(ConfigError, match="2 classes"):
        build_task(task_config("mini-sentiment", words=["no", "maybe", "yes"]), mini_dir, mcfg)
    assert len(glue.examples("train")) == 100


def test_build_task_missing_dataset_names_the_prepare_command(mini_dir, tmp_path):
    with pytest.raises(DataError, match=r"run `upctl prepare mini` first"):
        build_task(task_config("mini-faces"), mini_dir, model_config("tiny"))
    with pytest.raises(DataError, match=r"run `upctl prepare coco` first"):
        build_task(task_config("coco-pt-retrieval"), tmp_path, model_config("tiny"))
    assert prepare_name("glue-sst2") == "glue-sst2" and prepare_name("mini-video") == "mini"


def test_vision_families_resolve_when_their_modules_exist():
    # The vision families live in modules written separately; when present they must hold Task classes.
    for family in ("image_cls", "video_cls", "retrieval", "caption"):
        module = FAMILIES[family].partition(":")[0]
        if importlib.util.find_spec(module) is None:
            with pytest.raises(ConfigError, match="not available"):
                family_class(family)
        else:
            assert family_class(family).family == family


def test_upctl_tasks_command(tmp_path):
    from upctl.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "--json", str(tmp_path / "tasks.json")])
    assert res.exit_code == 0, res.output
    for name in ("imagenet", "vqav2", "glue-mnli", "mini-sentiment"):
        assert name in res.output
    data = json.loads((tmp_path / "tasks.json").read_text())
    assert [t["name"] for t in data["tasks"]] == list(CATALOG)
    assert data["aliases"]["vqa"] == "vqav2" and data["families"]["glue"].endswith(":GlueCloze")
    sent = next(t for t in data["tasks"] if t["name"] == "mini-sentiment")
    assert sent["held_out"] is True and sent["prompt_recipe"] == "recipes/prompt/mini-sentiment.yaml"

    res = runner.invoke(app, ["tasks", "--kind", "mini", "--options", "--json", str(tmp_path / "mini.json")])
    assert res.exit_code == 0 and "mini-news-mlm" in res.output and "imagenet21k" not in res.output
    assert "options" in res.output
    mini = json.loads((tmp_path / "mini.json").read_text())["tasks"]
    assert {t["name"] for t in mini} == set(MINI) | {"mini-digits-caption"}
    assert next(t for t in mini if t["name"] == "mini-news-mlm")["defaults"]["options"]["vocab"] == "corpus"
    res = runner.invoke(app, ["tasks", "--family", "ocr"])
    assert res.exit_code == 1 and "unknown" in res.output and "Traceback" not in res.output


def test_training_pools_are_the_references():
    """Downstream tasks train on the reference's pools (train + val views written by the preparers)."""
    for name in ("coco-caption", "coco-retrieval", "flickr30k-caption", "flickr30k-retrieval",
                 "msvd-caption", "msvd-retrieval", "msrvtt-caption"):
        assert task_config(name).split == "trainval", name
    assert task_config("msrvtt-retrieval").split == "trainval9k"
    assert task_config("vqav2").split == "trainval_vg|trainval"
    assert task_config("imagenet").split == "train"


def test_first_present_split_takes_the_first_prepared_alternative():
    from uniperceiver.tasks.catalog import first_present_split

    present = {"train", "trainval"}.__contains__
    assert first_present_split("trainval_vg|trainval", present, "vqav2") == "trainval"
    assert first_present_split("train", present, "vqav2") == "train"
    assert first_present_split("trainval_vg|val", present, "vqav2") == "trainval_vg"  # the error names it
    with pytest.raises(ConfigError, match="empty split"):
        first_present_split("|", present, "vqav2")
