"""The Task contract: every hook the engine or the evaluation calls is declared on `Task` with a
default and documented once; the real families answer them; the engine's target path uses them;
and no module of the engine or the evaluation probes a task with getattr or compares family names.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uniperceiver.data.format import prepare_dataset
from uniperceiver.engine.distributed import DistEnv
from uniperceiver.engine.targets import TargetSets
from uniperceiver.modeling.model import build_model
from uniperceiver.tasks import base as base_module
from uniperceiver.tasks import build_task, task_config
from uniperceiver.tasks.base import Task, encode_targets
from uniperceiver.tasks.custom import build_custom_task, load_custom_spec

ROOT = Path(__file__).resolve().parents[1]
#: hook -> its default on `Task`, as the module docstring documents it.
HOOKS = ["target_set", "target_set_varies", "training_target_set", "targets_are_texts", "encode_target_set",
         "evaluation_extras", "eval_batch_size", "set_feature_gathering"]


def test_every_hook_is_declared_with_a_default_and_documented():
    doc = base_module.__doc__ or ""
    for name in HOOKS:
        member = inspect.getattr_static(Task, name)
        assert not getattr(member, "__isabstractmethod__", False), name
        assert f"`{name}" in doc, f"{name} is not documented in uniperceiver/tasks/base.py"
    assert Task.__abstractmethods__ == {"load", "collate", "loss", "evaluate_batch", "compute_metrics"}


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini-contract")
    prepare_dataset("mini", None, root, options={"only": "digits,photos,sentiment"})
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", depth=1).eval()


def test_defaults_on_a_text_target_family(mini_data, model):
    task = build_task(task_config("mini-sentiment"), mini_data, model.cfg)
    ts = task.target_set()
    assert task.target_set_varies is False and task.targets_are_texts is True
    assert task.training_target_set(np.random.default_rng(0)) is ts
    with torch.no_grad():
        assert torch.equal(task.encode_target_set(model, ts), encode_targets(model, ts))
    assert task.evaluation_extras() == {}
    assert task.eval_batch_size == task.cfg.batch_size
    assert build_task(task_config("mini-sentiment", eval_batch_size=3), mini_data, model.cfg).eval_batch_size == 3


def test_retrieval_follows_the_run_unless_its_option_says_otherwise(mini_data, model):
    task = build_task(task_config("mini-photos-retrieval"), mini_data, model.cfg)
    assert task.target_set() is None and task.gather is False
    task.set_feature_gathering(True)
    assert task.gather is True
    fixed = build_task(task_config("mini-photos-retrieval", gather_features=False), mini_data, model.cfg)
    fixed.set_feature_gathering(True)
    assert fixed.gather is False
    other = build_task(task_config("mini-digits"), mini_data, model.cfg)
    other.set_feature_gathering(True)  # a family whose loss has no use for it ignores it


def test_engine_target_sets_use_the_hooks(mini_data, model):
    names = build_task(task_config("mini-digits"), mini_data, model.cfg)
    images = build_task(task_config("mini-digits", targets="images",
                                    target_examples={"per_class": 1, "split": "train"}), mini_data, model.cfg)
    assert names.targets_are_texts and not images.targets_are_texts
    sets = TargetSets([names, images], seed=0)
    assert sets.token_ids(0, 1, 0) is sets.token_ids(0, 2, 0)  # cached: the set does not vary
    env = DistEnv()
    with torch.no_grad():
        for index, task in enumerate((names, images)):
            feats, tie = sets.plan(index, 0, 0, env).encode(model)
            assert tie is None
            assert torch.allclose(feats, task.encode_target_set(model, task.target_set()), atol=1e-6)


def test_custom_task_reports_skipped_candidates_as_evaluation_extras(tmp_path, model):
    from skimage import data as skdata

    for cls, name in (("cat", "chelsea"), ("coffee", "coffee")):
        (tmp_path / "examples" / cls).mkdir(parents=True)
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / "examples" / cls / f"{name}.png")
    (tmp_path / "examples" / "cat" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "inputs").mkdir()
    Image.fromarray(skdata.astronaut()).save(tmp_path / "inputs" / "astronaut.png")
    (tmp_path / "task.yaml").write_text("inputs: {images: inputs}\ncandidates: {images: examples}\n")
    from uniperceiver.tokenizers.text import get_tokenizer

    task = build_custom_task(load_custom_spec(tmp_path / "task.yaml"), get_tokenizer(), model.cfg)
    assert task.targets_are_texts is False and task.evaluation_extras() == {}
    with torch.no_grad():
        feats = task.encode_target_set(model, task.target_set())
    assert feats.shape[0] == 2
    extras = task.evaluation_extras()
    assert list(extras) == ["candidate_skipped"] and sum(extras["candidate_skipped"].values()) == 1


# -- no probing: engine and evaluation know tasks only through `Task` ------------------------------


def _mentions_task(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and "task" in n.id.lower() or isinstance(n, ast.Attribute) and "task" in n.attr.lower()
               for n in ast.walk(node))


def _is_family(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "family" or isinstance(node, ast.Name) and node.id == "family"


def probes(source: str, filename: str) -> list[str]:
    """`getattr` / `hasattr` on a task, a family compared, or task options edited in place."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if node.args and _mentions_task(node.args[0]):
                found.append(f"{where}: {node.func.id} on a task")
        elif isinstance(node, ast.Compare) and any(_is_family(n) for side in [node.left, *node.comparators]
                                                   for n in ast.walk(side)):
            found.append(f"{where}: family compared")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "options":
                    found.append(f"{where}: task options edited in place")
    return found


def test_the_probe_finder_finds_probes():
    bad = ("def f(task, cfg):\n    enc = getattr(task, 'encode_target_set', None)\n"
           "    if cfg.family == 'retrieval':\n        cfg.options['gather_features'] = True\n"
           "    return hasattr(self.tasks[0], 'x') or 'vqa' in [cfg.family]\n")
    assert len(probes(bad, "bad.py")) == 5
    assert probes("def f(task):\n    return task.target_set_varies and getattr(model, 'cls_head', None)\n", "ok.py") == []


@pytest.mark.parametrize("package", ["engine", "evaluation"])
def test_no_module_probes_tasks(package):
    files = sorted((ROOT / "uniperceiver" / package).rglob("*.py"))
    assert files
    found = [p for f in files for p in probes(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, found
