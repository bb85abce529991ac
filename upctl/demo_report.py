"""The demo's results: read the commands' `--json` records, aggregate seeds, write Markdown, JSON and PNG.

Everything here reads files the `upctl` commands wrote (`<out>/json/*.json`, the prepared data's
manifests and few-shot subset files); nothing parses terminal output.

Chance levels (what a model that learned nothing would score on the same samples):
- accuracy: the best constant guess, i.e. the share of the most frequent label (50% on the
  balanced mini-faces / mini-sentiment validation splits);
- retrieval R@1 (video to text): a random ranking of the captions. Identical captions get
  identical features and the metric counts ties as hits, so a query hits with probability
  (distinct captions of its own) / (distinct captions in the split), averaged over queries.
Spread: the sample standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from uniperceiver.utils.files import atomic_write, atomic_write_json, atomic_write_text
from upctl.demo import DemoError, DemoPlan, Layout, Stage
from upctl.demo_baselines import compute_baseline

REGIMES = ("zeroshot", "prompt", "finetune")
REGIME_LABELS = {"zeroshot": "zero-shot", "prompt": "prompt tuning", "finetune": "fine-tuning"}
RESULT_KEYS = ("demo", "pretrain", "stages", "tasks")


#: The checks of every held-out task, in the order the table states them.
CHECKS = ("zeroshot_above_chance_beyond_spread", "prompt_above_zeroshot", "finetune_at_least_prompt",
          "finetune_within_5_of_baseline")
#: Short names of the checks for the terminal table.
CHECK_SHORT = {"zeroshot_above_chance_beyond_spread": "zs>chance", "prompt_above_zeroshot": "prompt>zs",
               "finetune_at_least_prompt": "ft>=prompt", "finetune_within_5_of_baseline": "ft>=base-5"}
#: Points fine-tuning may trail the classic baseline and still count as "trained properly".
BASELINE_MARGIN = 5.0
#: The benchmark's goals over all held-out tasks: (check, how many tasks must pass; None = all).
GOALS = (("zeroshot_above_chance_beyond_spread", 3), ("prompt_above_zeroshot", None),
         ("finetune_within_5_of_baseline", None))

def read_record(path: Path) -> dict[str, Any]:
    """One command's `--json` record, or a DemoError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoError(f"{path}: missing; the command that writes it did not run or failed") from None
    except json.JSONDecodeError as exc:
        raise DemoError(f"{path}: not valid JSON ({exc})") from None


def metric_of(record: dict[str, Any], key: str, where: Path) -> float:
    value = (record.get("metrics") or {}).get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise DemoError(f"{where}: metrics.{key} missing or not a number (metrics: {sorted(record.get('metrics') or {})})")
    return float(value)


def accuracy_chance(record: dict[str, Any]) -> float:
    """Percent scored by always answering the most frequent label of the evaluated samples."""
    labels = [p.get("label") for p in record.get("predictions") or [] if p.get("label") is not None]
    if not labels:
        raise DemoError(f"record of {record.get('task')!r} has no labelled predictions to derive chance from")
    return 100.0 * max(Counter(labels).values()) / len(labels)


def retrieval_chance(record: dict[str, Any], data_dir: Path) -> float:
    """Expected R@1 (percent, query = video) of a random caption ranking on the evaluated samples."""
    from uniperceiver.data.format import open_dataset

    ds = open_dataset(str(record["dataset"]), data_dir)
    by_id = {str(s["id"]): s for s in ds.load_split(str(record["split"]))}
    ids = [str(p["id"]) for p in record.get("predictions") or []]
    if not ids:
        raise DemoError(f"record of {record.get('task')!r} has no predictions")
    own = [set(by_id[i].get("texts") or []) for i in ids]
    distinct = set().union(*own)
    return 100.0 * sum(len(o) / len(distinct) for o in own) / len(own)


def shown_path(path: Path) -> str:
    """A path as results.json records it: relative to the working directory when inside it, so a recorded run
    can be committed and compared without naming the machine's folders."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command_line() -> str:
    """How this run was started (recorded so a results.json says which command made it)."""
    return " ".join(["upctl", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("upctl", "__main__.py") else " ".join(sys.argv)


def machine_summary() -> dict[str, Any]:
    """CPU model, core count and library versions: what exact reproduction of the numbers depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__}


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is 0 for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _subset_size(data_dir: Path, dataset: str, fraction: float, seed: int) -> int:
    from uniperceiver.data.fewshot import subset_path_name
    from uniperceiver.data.format import SPLITS_DIR

    path = data_dir / dataset / SPLITS_DIR / subset_path_name("train", fraction, seed)
    return int(read_record(path)["num_samples"])


def _model_summary(plan: DemoPlan) -> dict[str, Any]:
    """Size, width, depth and pre-training tasks of the recipe's model (for the table's caption)."""
    from uniperceiver.config import load_recipe
    from uniperceiver.modeling.model_config import model_config

    rec = load_recipe(plan.pretrain_recipe)
    cfg = model_config(rec.model.size, **dict(rec.model.overrides))
    return {"size": rec.model.size, "width": cfg.width, "depth": cfg.depth, "heads": cfg.heads,
            "image_size": cfg.image_size, "tasks": [t.name for t in rec.tasks]}


def collect(plan: DemoPlan, lay: Layout, stages: Sequence[Stage], started: float, total_s: float,
            pretrain_steps: int, threads: int = 1) -> dict[str, Any]:
    """The results document (what results.json holds) from the commands' records."""
    prep = read_record(lay.prepare_record)
    split_counts = {str(k): int(v) for k, v in (prep.get("splits") or {}).items()}
    tasks = []
    for t in plan.tasks:
        regimes: dict[str, Any] = {}
        first: dict[str, Any] | None = None
        for regime in REGIMES:
            values, files, train_n, eval_n = [], [], [], []
            for s in plan.seeds:
                path = lay.record(regime, t.task, s)
                rec = read_record(path)
                first = first or rec
                values.append(metric_of(rec, t.metric, path))
                files.append(str(path.relative_to(lay.out)))
                eval_n.append(int(rec["num_samples"]))
                dataset = str(rec["dataset"])
                if regime == "zeroshot":
                    train_n.append(0)
                elif regime == "prompt":
                    train_n.append(_subset_size(lay.data_dir, dataset, t.prompt_fraction, s))
                else:
                    train_n.append(split_counts.get(f"{dataset}/train", -1))
            mean, std = spread(values)
            regimes[regime] = {"values": values, "mean": mean, "std": std, "seeds": list(plan.seeds), "files": files,
                               "train_samples": train_n, "eval_samples": eval_n,
                               "fraction": t.prompt_fraction if regime == "prompt" else (1.0 if regime == "finetune" else 0.0)}
        assert first is not None
        chance = accuracy_chance(first) if t.chance_kind == "accuracy" else retrieval_chance(first, lay.data_dir)
        baseline = compute_baseline(t.baseline, str(first["dataset"]), lay.data_dir, "train", str(first["split"]))
        zs, pt, ft = (regimes[r] for r in REGIMES)
        tasks.append({
            "task": t.task, "family": first.get("family"), "dataset": first.get("dataset"), "split": first.get("split"),
            "metric": t.metric, "metric_label": t.metric_label, "chance": chance, "chance_kind": t.chance_kind,
            "new_in_this_task": t.new, "prompt_fraction_note": t.fraction_note, "regimes": regimes,
            "baseline": baseline.as_dict(),
            "checks": {
                "zeroshot_above_chance_beyond_spread": zs["mean"] - zs["std"] > chance,
                "prompt_above_zeroshot": pt["mean"] > zs["mean"],
                "finetune_at_least_prompt": ft["mean"] >= pt["mean"],
                "finetune_within_5_of_baseline": ft["mean"] >= baseline.value - BASELINE_MARGIN,
            },
        })
    return {
        "demo": {"quick": plan.quick, "seeds": list(plan.seeds), "data_dir": shown_path(lay.data_dir), "out": shown_path(lay.out),
                 "command": command_line(), "machine": machine_summary(), "threads_per_command": threads,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                 "total_seconds": round(total_s, 1), "spread": "sample standard deviation over seeds"},
        "pretrain": {"recipe": shown_path(plan.pretrain_recipe), "steps": pretrain_steps, "model": _model_summary(plan),
                     "runs": [str(lay.pretrain_run(s).relative_to(lay.out)) for s in plan.seeds]},
        "stages": [{"stage": st.key, "description": st.description, "commands": len(st.jobs),
                    "seconds": round(st.seconds, 1)} for st in stages],
        "tasks": tasks,
    }


# ------------------------------------------------------------------------------------------ rendering


def fmt(mean: float, std: float, n_seeds: int) -> str:
    return f"{mean:.1f}" if n_seeds == 1 else f"{mean:.1f} ± {std:.1f}"


def _cells(task: dict[str, Any]) -> list[str]:
    r = task["regimes"]
    n = len(r["zeroshot"]["values"])
    pt_n = sorted(set(r["prompt"]["train_samples"]))
    pt_share = f"{100 * r['prompt']['fraction']:g}%: {'/'.join(map(str, pt_n))} samples"
    ft_n = sorted(set(r["finetune"]["train_samples"]))
    b = task["baseline"]
    return [
        f"{task['task']}",
        f"{task['metric_label']} ({task['split']}, n={r['zeroshot']['eval_samples'][0]})",
        f"{task['chance']:.1f}",
        f"{b['value']:.1f} ({BASELINE_SHORT.get(b['method'], b['method'])})",
        fmt(r["zeroshot"]["mean"], r["zeroshot"]["std"], n),
        f"{fmt(r['prompt']['mean'], r['prompt']['std'], n)} ({pt_share})",
        f"{fmt(r['finetune']['mean'], r['finetune']['std'], n)} (100%: {'/'.join(map(str, ft_n))} samples)",
    ]


HEADER = ["held-out task", "metric (eval split, n)", "chance", "classic baseline (100%)", "zero-shot",
          "prompt tuning (train share)", "fine-tuning (train share)"]
BASELINE_SHORT = {"pixels_logreg": "pixels + logreg", "tfidf_logreg": "TF-IDF + logreg", "video_nn": "pixel NN"}


def goal_lines(results: dict[str, Any]) -> list[str]:
    """One line per goal of the benchmark (GOALS): how many held-out tasks pass it, and whether that is enough."""
    tasks = results["tasks"]
    lines = []
    for check, need in GOALS:
        passed = [t["task"] for t in tasks if t["checks"].get(check)]
        want = len(tasks) if need is None else need
        verdict = "holds" if len(passed) >= want else "does NOT hold"
        lines.append(f"goal {check.replace('_', ' ')} on {'all' if need is None else f'at least {need} of'} "
                     f"{len(tasks)} tasks: {len(passed)} of {len(tasks)}, {verdict}")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    d, p = results["demo"], results["pretrain"]
    m = p["model"]
    seeds = d["seeds"]
    lines = [
        "# Uni-Perceiver on the mini benchmark: zero-shot, prompt tuning, fine-tuning",
        "",
        f"One model ({m['size']} size at width {m['width']} x {m['depth']} layers, {m['image_size']} px) pre-trained "
        f"by `recipes/mini/{Path(p['recipe']).name}` for {p['steps']} steps on image, video and text tasks together "
        f"({', '.join(m['tasks'])}), then scored on held-out tasks it never trained on. Values in percent, "
        + (f"mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}): seed s "
           "pre-trains, draws the few-shot subset and tunes." if len(seeds) > 1 else f"one seed ({seeds[0]}).")
        + (" QUICK run: a few steps only, the numbers are not meaningful." if d["quick"] else ""),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] * len(HEADER)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(t)) + " |" for t in results["tasks"]]
    lines += ["", "What each held-out task adds that pre-training never showed:", ""]
    lines += [f"- `{t['task']}`: {t['new_in_this_task']}." for t in results["tasks"]]
    lines += ["", "Classic baselines (scikit-learn on the same training split, scored on the same samples; deterministic, "
              "no seed spread):", ""]
    lines += [f"- `{t['task']}`: {t['baseline']['description']}, trained on {t['baseline']['train_split']} "
              f"(n={t['baseline']['train_samples']})." for t in results["tasks"]]
    lines += ["", f"Checks (mean over seeds; zero-shot must clear chance by more than its spread; fine-tuning may trail "
              f"the baseline by at most {BASELINE_MARGIN:g} points):", ""]
    for t in results["tasks"]:
        c = t["checks"]  # in CHECKS order: a results.json written with sorted keys renders the same
        marks = ", ".join(f"{name.replace('_', ' ')}: {'yes' if c[name] else 'NO'}" for name in CHECKS if name in c)
        lines.append(f"- `{t['task']}`: {marks}")
    lines += ["", *[f"- {line}" for line in goal_lines(results)]]
    lines += ["", "Stages (wall-clock seconds):", "", "| stage | commands | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['commands']} | {s['seconds']:.0f} |" for s in results["stages"]]
    lines += [f"| total | {sum(s['commands'] for s in results['stages'])} | {d['total_seconds']:.0f} |", ""]
    return "\n".join(lines)


def render_chart(results: dict[str, Any], path: Path) -> None:
    """Grouped bars (zero-shot, prompt tuning, fine-tuning) per task, seed spread as error bars, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(2.6 + 2.4 * len(tasks), 4.2), dpi=110)
    width = 0.2
    colours = {"zeroshot": "#8da0cb", "prompt": "#fc8d62", "finetune": "#66c2a5", "baseline": "#bbbbbb"}
    series = [(REGIME_LABELS[r], colours[r], [t["regimes"][r]["mean"] for t in tasks],
               [t["regimes"][r]["std"] for t in tasks]) for r in REGIMES]
    series.append(("classic baseline", colours["baseline"], [t["baseline"]["value"] for t in tasks], None))
    for k, (label, colour, means, stds) in enumerate(series):
        xs = [i + (k - 1.5) * width for i in range(len(tasks))]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, color=colour, label=label,
                      hatch="//" if stds is None else None, edgecolor="white" if stds is None else None)
        for b, m, sd in zip(bars, means, stds or [0.0] * len(means)):  # above the error bar
            ax.text(b.get_x() + b.get_width() / 2, m + sd + 1.5, f"{m:.0f}", ha="center", va="bottom", fontsize=7)
    for i, t in enumerate(tasks):
        ax.hlines(t["chance"], i - 2.1 * width, i + 2.1 * width, colors="black", linestyles="dashed", linewidth=1,
                  label="chance" if i == 0 else None)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t['task']}\n{t['metric_label']}\nchecks held: {sum(1 for c in CHECKS if t['checks'].get(c))}"
                        f"/{len(CHECKS)}" for t in tasks], fontsize=8)
    ax.set_ylim(0, 125)
    ax.set_ylabel("percent")
    n = len(results["demo"]["seeds"])
    ax.set_title(f"held-out tasks: mean over {n} seed(s)" + (", error bars = std" if n > 1 else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=5)
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()))


def write_results(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """results.md, results.json and results.png in `out` (each written atomically)."""
    paths = {"md": out / "results.md", "json": out / "results.json", "png": out / "results.png"}
    atomic_write_text(paths["md"], render_markdown(results))
    atomic_write_json(paths["json"], results)
    render_chart(results, paths["png"])
    return paths


__all__ = ["BASELINE_MARGIN", "CHECK_SHORT", "CHECKS", "GOALS", "HEADER", "REGIMES", "goal_lines", "RESULT_KEYS", "accuracy_chance", "collect", "read_record", "render_chart",
           "render_markdown", "retrieval_chance", "spread", "write_results"]
