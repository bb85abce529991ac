"""The `mini` benchmark behind `upctl demo` / `scripts/demo.sh`: the paper's three regimes on real data.

One tiny model is pre-trained on the mini mixture (image, video and text tasks together), then
scored on held-out tasks it never trained on, three ways: zero-shot (no update), prompt tuning
on a seeded few-shot share (only LayerNorms, deep prompts and the SPE bias train) and full
fine-tuning on the whole training split. Every stage is a REAL `upctl` command run as a
subprocess (its output goes to `<out>/logs/`); the numbers come only from the files the commands
write (`--json` records of `upctl prepare / zeroshot / evaluate`, the run folders of the training
commands), never from terminal text. `upctl.demo_report` turns them into the results table.

Seeds: seed s pre-trains with train.seed=s and prompt-tunes / fine-tunes from that model with
--seed s (which also draws the few-shot subset), so the spread of every regime includes the
pre-training's own variance. Commands of one stage run side by side (`jobs`, one thread each).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from uniperceiver.errors import UpctlError

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_RECIPE = ROOT / "recipes" / "mini" / "pretrain.yaml"


class DemoError(UpctlError):
    """A demo stage failed (the message names the command and its log file)."""


@dataclass(frozen=True)
class HeldOut:
    """One held-out task of the table: how it is scored and tuned, and what is new about it."""

    task: str
    #: Key of the headline metric in the command's `metrics`.
    metric: str
    metric_label: str
    #: "accuracy" (best constant guess) or "retrieval_r1" (random ranking, ties count as hits).
    chance_kind: str
    #: What pre-training never showed the model (why this is zero-shot transfer).
    new: str
    #: The classic baseline beside the regimes (a key of `upctl.demo_baselines.BASELINES`).
    baseline: str
    #: Few-shot share for prompt tuning (the paper uses 0.01; see `fraction_note`).
    prompt_fraction: float
    fraction_note: str = ""
    #: Extra `--set` overrides of `upctl prompt-tune` / `upctl finetune` (e.g. a batch size).
    prompt_sets: tuple[str, ...] = ()
    finetune_sets: tuple[str, ...] = ()
    #: Steps of this task's fine-tuning when not the recipe's (a quick plan's override wins).
    finetune_steps: int | None = None


@dataclass(frozen=True)
class DemoPlan:
    """What `run_demo` runs. Steps None = the recipe's own `train.max_steps`."""

    tasks: tuple[HeldOut, ...]
    seeds: tuple[int, ...]
    pretrain_recipe: Path = PRETRAIN_RECIPE
    pretrain_steps: int | None = None
    prompt_steps: int | None = None
    finetune_steps: int | None = None
    quick: bool = False


HELD_OUT: tuple[HeldOut, ...] = (
    HeldOut(
        task="mini-digits", metric="top1", metric_label="top-1 accuracy", chance_kind="accuracy",
        new="classification against the bare class names 'zero'..'nine' (pre-training saw these images only "
            "as image-caption pairs 'a handwritten digit ...')",
        baseline="pixels_logreg", prompt_fraction=0.01, fraction_note="1% = int(0.01 x 125) + 1 = 2 images per digit",
        # 1,258 training images: the template's 40 steps x 16 are half an epoch, 1,200 x 32 about 30 epochs
        # (seed 2's model: 800 steps 88.5%, 1,000 89.6%, 1,200 90.3%; docs/DEMO.md).
        finetune_sets=("tasks.0.batch_size=32",), finetune_steps=1200,
    ),
    HeldOut(
        task="mini-faces", metric="top1", metric_label="top-1 accuracy", chance_kind="accuracy",
        new="face / not-a-face images and both class names (no faces, no word 'face' as a class in pre-training)",
        baseline="pixels_logreg", prompt_fraction=0.01, fraction_note="1% = int(0.01 x 50) + 1 = 1 image per class",
    ),
    HeldOut(
        task="mini-video-retrieval", metric="i2t_R@1", metric_label="video-to-text R@1", chance_kind="retrieval_r1",
        new="video-text retrieval with free captions (pre-training saw these clips only as 3-way classification)",
        baseline="video_nn", prompt_fraction=0.01, prompt_sets=("tasks.0.batch_size=3",), finetune_sets=("tasks.0.batch_size=4",),
        fraction_note="1% = int(0.01 x n) + 1 = 1 window per clip class (3 windows), one batch of 3",
    ),
    HeldOut(
        task="mini-sentiment", metric="accuracy", metric_label="accuracy", chance_kind="accuracy",
        new="sentiment as the SST-2 cloze {bad, wonderful} (the only text task in pre-training is masked LM on news)",
        baseline="tfidf_logreg", prompt_fraction=0.01, fraction_note="1% = int(0.01 x 50) + 1 = 1 sentence per label",
    ),
)

QUICK_STEPS = {"pretrain": 20, "prompt": 5, "finetune": 5}


def default_plan(*, quick: bool = False, seeds: int | None = None) -> DemoPlan:
    """The shipped demo: 3 seeds and the recipes' step counts, or `quick` (1 seed, a few steps)."""
    n = seeds if seeds is not None else (1 if quick else 3)
    if n < 1:
        raise DemoError(f"--seeds must be at least 1, got {n}")
    plan = DemoPlan(tasks=HELD_OUT, seeds=tuple(range(n)), quick=quick)
    if quick:
        plan = replace(plan, pretrain_steps=QUICK_STEPS["pretrain"], prompt_steps=QUICK_STEPS["prompt"],
                       finetune_steps=QUICK_STEPS["finetune"])
    return plan


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Where the demo writes: `<out>/json`, `<out>/logs`, `<out>/runs`, and the prepared data."""

    out: Path
    data_dir: Path

    @property
    def json_dir(self) -> Path:
        return self.out / "json"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def pretrain_run(self, seed: int) -> Path:
        return self.runs / f"pretrain-s{seed}"

    def tuned_run(self, regime: str, task: str, seed: int) -> Path:
        return self.runs / f"{regime}-{task}-s{seed}"

    def record(self, regime: str, task: str, seed: int) -> Path:
        """The `--json` record of one (regime, task, seed) evaluation."""
        return self.json_dir / f"{regime}-{task}-s{seed}.json"

    @property
    def prepare_record(self) -> Path:
        return self.json_dir / "prepare.json"


# ------------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    """One `upctl` call. `run_dir` (training) lets the progress bar follow its steps."""

    name: str
    args: list[str]
    log: Path
    units: int = 1
    run_dir: Path | None = None
    seconds: float = 0.0
    done_units: int = 0


@dataclass
class Stage:
    """A stage of the demo: chains of jobs (each chain runs in order; chains run side by side)."""

    key: str
    description: str
    chains: list[list[Job]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def jobs(self) -> list[Job]:
        return [j for chain in self.chains for j in chain]


def upctl_prefix() -> list[str]:
    """How to call the CLI: the `upctl` script beside this Python, else `python -m upctl` (same app)."""
    script = Path(sys.executable).parent / "upctl"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "upctl"]


def child_env(threads: int) -> dict[str, str]:
    """Environment of every command: `threads` BLAS/OpenMP threads, no colour codes in the logs."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["NO_COLOR"] = "1"
    env["TERM"] = "dumb"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def last_logged_step(run_dir: Path) -> int:
    """The highest step in a run's metrics.csv so far (0 when none): the training job's progress."""
    path = run_dir / "metrics.csv"
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return 0
    best = 0
    for row in csv.reader(io.StringIO(text)):
        if row and row[0].isdigit():
            best = max(best, int(row[0]))
    return best


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Runner:
    """Runs a stage's chains with at most `jobs` commands at once; stops everything on a failure."""

    def __init__(self, jobs: int, threads: int, on_update: Callable[[], None] | None = None,
                 on_done: Callable[[Job], None] | None = None) -> None:
        self.jobs = max(1, int(jobs))
        self.env = child_env(max(1, int(threads)))
        self.prefix = upctl_prefix()
        self.on_update = on_update
        self.on_done = on_done
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._failure: DemoError | None = None

    def _run_job(self, job: Job) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        with open(job.log, "w", encoding="utf-8") as log:
            log.write("$ upctl " + " ".join(job.args) + "\n")
            log.flush()
            proc = subprocess.Popen(self.prefix + job.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=str(ROOT))
            with self._lock:
                self._procs.append(proc)
            rc = proc.wait()
            with self._lock:
                self._procs.remove(proc)
        job.seconds = time.perf_counter() - began
        if rc != 0:
            raise DemoError(f"`upctl {' '.join(job.args)}` failed (exit {rc}); log {job.log}:\n{_tail(job.log)}")
        job.done_units = job.units

    def _worker(self, queue: list[list[Job]]) -> None:
        while True:
            with self._lock:
                if not queue or self._failure is not None:
                    return
                chain = queue.pop(0)
            for job in chain:
                try:
                    self._run_job(job)
                except DemoError as exc:
                    with self._lock:
                        if self._failure is None:
                            self._failure = exc
                        for proc in self._procs:  # our own children only
                            proc.terminate()
                    return
                except BaseException as exc:  # noqa: BLE001 - reported as a stage failure
                    with self._lock:
                        if self._failure is None:
                            self._failure = DemoError(f"{job.name}: {exc}")
                    return
                if self.on_done is not None:
                    self.on_done(job)

    def run(self, stage: Stage) -> None:
        queue = list(stage.chains)
        workers = [threading.Thread(target=self._worker, args=(queue,), daemon=True)
                   for _ in range(min(self.jobs, len(queue)))]
        began = time.perf_counter()
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                for job in stage.jobs:
                    if job.run_dir is not None and job.done_units < job.units:
                        job.done_units = min(job.units - 1, last_logged_step(job.run_dir))
                if self.on_update is not None:
                    self.on_update()
                time.sleep(0.5)
        except KeyboardInterrupt:
            with self._lock:
                for proc in self._procs:
                    proc.terminate()
            raise
        finally:
            for w in workers:
                w.join()
            stage.seconds = time.perf_counter() - began
        if self.on_update is not None:
            self.on_update()
        if self._failure is not None:
            raise self._failure


# ------------------------------------------------------------------------------------------ stages


def _steps_args(steps: int | None) -> list[str]:
    return [] if steps is None else ["--max-steps", str(steps)]


def recipe_steps(path: Path) -> int:
    """train.max_steps of a recipe file (the progress bar's units for a training command)."""
    from uniperceiver.config import load_recipe

    return int(load_recipe(path).train.max_steps)


def task_recipe_steps(task: str, stage: str) -> int:
    """train.max_steps of a task's prompt-tune / fine-tune recipe (what the command will run)."""
    from uniperceiver.config import recipe_for_task

    return int(recipe_for_task(task, stage).train.max_steps)


def build_stages(plan: DemoPlan, lay: Layout, device: str | None = None) -> list[Stage]:
    """The five stages (prepare, pretrain, zeroshot, prompt-tune, finetune) as upctl argument lists."""
    data = ["--data-dir", str(lay.data_dir)]
    train_dev = [] if device in (None, "auto") else ["--device", device]
    eval_dev = ["--device", device or "auto"]
    names = ", ".join(t.task for t in plan.tasks)
    pt_steps = plan.pretrain_steps or recipe_steps(plan.pretrain_recipe)
    stages = [
        Stage("prepare", "prepare the mini datasets from installed packages (digits, photos, faces, clips, "
                         "sentences; no download)",
              [[Job("prepare", ["prepare", "mini", *data, "--json", str(lay.prepare_record)], lay.logs / "prepare.log")]]),
        Stage("pretrain", f"pre-train the tiny model on the mini mixture ({pt_steps} steps x {len(plan.seeds)} "
                          f"seed(s)): image, video and text tasks together, held-out tasks left out",
              [[Job(f"pretrain-s{s}",
                    ["pretrain", str(plan.pretrain_recipe), *data, "--output", str(lay.pretrain_run(s)),
                     "--set", f"train.seed={s}", *_steps_args(plan.pretrain_steps), *train_dev],
                    lay.logs / f"pretrain-s{s}.log", units=pt_steps, run_dir=lay.pretrain_run(s))]
               for s in plan.seeds]),
        Stage("zeroshot", f"zero-shot: score each pre-trained model on the held-out tasks ({names}), no update",
              [[Job(f"zeroshot-{t.task}-s{s}",
                    ["zeroshot", "--task", t.task, "--checkpoint", str(lay.pretrain_run(s)), *data,
                     "--json", str(lay.record("zeroshot", t.task, s)), "--no-cache", *eval_dev],
                    lay.logs / f"zeroshot-{t.task}-s{s}.log")]
               for s in plan.seeds for t in plan.tasks]),
    ]
    for regime, command, desc, fraction_of in (
        ("prompt", "prompt-tune", "prompt tuning on a few-shot share (LayerNorms, deep prompts, SPE bias train), "
                                  "then evaluate", lambda t: t.prompt_fraction),
        ("finetune", "finetune", "fine-tuning every weight on the whole training split, then evaluate", lambda t: None),
    ):
        chains = []
        for s in plan.seeds:
            for t in plan.tasks:
                run = lay.tuned_run(regime, t.task, s)
                steps = plan.prompt_steps if regime == "prompt" else (plan.finetune_steps or t.finetune_steps)
                units = steps or task_recipe_steps(t.task, "prompt_tune" if regime == "prompt" else "finetune")
                frac = fraction_of(t)
                train_args = [command, "--task", t.task, "--checkpoint", str(lay.pretrain_run(s)), "--seed", str(s),
                              *data, "--output", str(run), *_steps_args(steps), *train_dev]
                if frac is not None:
                    train_args += ["--fraction", f"{frac:g}"]
                for assignment in (t.prompt_sets if regime == "prompt" else t.finetune_sets):
                    train_args += ["--set", assignment]
                chains.append([
                    Job(f"{regime}-{t.task}-s{s}", train_args, lay.logs / f"{regime}-{t.task}-s{s}.log", units=units,
                        run_dir=run),
                    Job(f"evaluate-{regime}-{t.task}-s{s}",
                        ["evaluate", "--task", t.task, "--checkpoint", str(run), *data,
                         "--json", str(lay.record(regime, t.task, s)), "--no-cache", *eval_dev],
                        lay.logs / f"evaluate-{regime}-{t.task}-s{s}.log"),
                ])
        stages.append(Stage(regime, desc, chains))
    return stages


def prune_checkpoints(job: Job, keep: bool) -> None:
    """Drop a finished training run's resumable state (optimizer moments): the demo only needs final/."""
    if keep or job.run_dir is None:
        return
    ckpts = job.run_dir / "checkpoints"
    if (job.run_dir / "final" / "model.safetensors").is_file() and ckpts.is_dir():
        shutil.rmtree(ckpts, ignore_errors=True)


def clean_outputs(lay: Layout) -> None:
    """A re-run starts clean: old records, logs and runs of this output folder would mix in."""
    for sub in (lay.json_dir, lay.logs, lay.runs):
        if sub.exists():
            shutil.rmtree(sub)
    for name in ("results.md", "results.json", "results.png"):
        (lay.out / name).unlink(missing_ok=True)


def default_jobs() -> int:
    """Side-by-side commands, one thread each: 3 (one per default seed) up to 4 on larger machines.

    On 2 cores 3 single-threaded commands keep both cores busy through the stage barriers (3 seeds
    of pre-training finish together instead of 2 + 1); small models use extra threads poorly anyway.
    """
    return max(3, min(4, os.cpu_count() or 2))


__all__ = ["DemoError", "DemoPlan", "HELD_OUT", "HeldOut", "Job", "Layout", "Runner", "Stage", "build_stages",
           "clean_outputs", "default_jobs", "default_plan", "last_logged_step", "prune_checkpoints", "upctl_prefix"]
