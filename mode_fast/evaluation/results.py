"""Evaluation results as files: the method order, the markdown table, the plots, and the
per-task records in CLIP_benchmark's layout.

`mode-fast eval` writes them (results.json, results.md, accuracy.png, expert_weights.png,
retrieval.png, clip_benchmark/TASK__METHOD.json); the demo (`mode_fast.demo.pipeline`)
prints the same table. Library module: never imports a job module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from mode_fast.core.files import atomic_write, write_json

RECALL_KS = (1, 5, 10)
CB_DIR = "clip_benchmark"  # eval's records in CLIP_benchmark's result layout, one per task and method
CB_LANGUAGE = "en"


def path_key(name: str) -> str:
    """A task or model name as one path component: percent-quoted, dots included, so no
    name is '..', a hidden file, or an fnmatch pattern."""
    return quote(name, safe="").replace(".", "%2E")


def method_order(results: dict[str, Any], n_experts: int) -> list[str]:
    singles = results["single_models"]
    return [f"expert_{k}" for k in range(n_experts)] + ["best_expert", "mean_ensemble", "mode_ensemble"] + singles


def ensemble_note(results: dict[str, Any]) -> str:
    """Which similarities the ensembles combined (results.json `ensemble_inputs`)."""
    inputs = results.get("ensemble_inputs", "scaled")  # older results: eval scaled them
    if inputs == "cosine":
        return "Ensembles combine the experts' plain cosine similarities (MoDE's way)."
    return "Ensembles combine the experts' cosine similarities times each expert's logit scale."


def markdown_table(results: dict[str, Any]) -> str:
    n = results["n_experts"]
    methods = method_order(results, n)
    lines = []
    if results["tasks"]:
        lines += [
            "Zero-shot top-1 accuracy (%). " + ensemble_note(results),
            "",
            "| task | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for name, t in results["tasks"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * t['top1'][m]:.1f}" for m in methods) + " |")
        avg = results["average"]["top1"]
        lines.append("| **average** | " + " | ".join(f"**{100 * avg[m]:.1f}**" for m in methods) + " |")
        if all("mean_per_class_recall" in t for t in results["tasks"].values()):  # results before 0.3 lack it
            lines += [
                "",
                "Zero-shot top-5 accuracy / mean per-class recall (%)",
                "",
                "| task | " + " | ".join(methods) + " |",
                "|---" * (len(methods) + 1) + "|",
            ]
            rows = [*results["tasks"].items(), ("**average**", results["average"])]
            for name, t in rows:
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        f"{100 * t['top5'][m]:.1f} / {100 * t['mean_per_class_recall'][m]:.1f}" for m in methods
                    )
                    + " |"
                )
        lines += [
            "",
            "MoDE expert weights (classes per expert)",
            "",
            "| task | " + " | ".join(f"expert_{k}" for k in range(n)) + " |",
            "|---" * (n + 1) + "|",
        ]
        for name, t in results["tasks"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{w:.3f} ({c})" for w, c in zip(t["expert_weights"], t["classes_per_expert"]))
                + " |"
            )
    if results["retrieval"]:
        lines += [
            "",
            "Image-text retrieval recall (%), image->text / text->image",
            "",
            "| task | method | "
            + " | ".join(f"i2t R@{k}" for k in RECALL_KS)
            + " | "
            + " | ".join(f"t2i R@{k}" for k in RECALL_KS)
            + " |",
            "|---" * (2 + 2 * len(RECALL_KS)) + "|",
        ]
        for name, t in results["retrieval"].items():
            for m in methods:
                r = t["recall"][m]
                lines.append(
                    f"| {name} | {m} | "
                    + " | ".join(
                        f"{100 * r[f'{d}_R@{k}']:.1f}" for d in ("image_to_text", "text_to_image") for k in RECALL_KS
                    )
                    + " |"
                )
    lines += skip_lines(results)
    return "\n".join(lines) + "\n"


def skip_lines(results: dict[str, Any]) -> list[str]:
    """results.md lines: per task, the samples read and those skipped (by reason)."""
    lines = []
    for kind, count in (("tasks", "n_images"), ("retrieval", "n_pairs")):
        for name, t in results.get(kind, {}).items():
            reasons = ", ".join(f"{r} {n}" for r, n in t.get("skipped", {}).items())
            lines.append(
                f"- {name}: read {t[count]}, skipped {t.get('skipped_total', 0)}" + (f" ({reasons})" if reasons else "")
            )
    return ["", "Samples read and skipped", "", *lines] if lines else []


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Write a pyplot figure as PNG atomically (110 dpi) and close it; the one figure
    writer for eval's and the demo's plots."""
    import matplotlib.pyplot as plt

    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, **savefig)
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chance_lines(ax: Any, chances: Sequence[float]) -> None:
    """A dotted chance level (a fraction) across each bar group, one legend entry."""
    for i, chance in enumerate(chances):
        ax.hlines(
            100 * chance, i - 0.45, i + 0.45, colors="black", linestyles=":", lw=1.2, label="chance" if i == 0 else None
        )


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    n = results["n_experts"]
    methods = method_order(results, n)
    written = []
    if results["tasks"]:
        groups = list(results["tasks"]) + ["average"]
        values = [
            [results["tasks"][g]["top1"][m] if g != "average" else results["average"]["top1"][m] for m in methods]
            for g in groups
        ]
        # 10 x 4 in at 110 dpi (about 1,200 px with the legend): fits a laptop screen
        # whatever the number of tasks and methods; the legend sits outside the bars.
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(methods)
        cmap = plt.get_cmap("tab10")
        for j, m in enumerate(methods):
            xs = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
            ax.bar(
                xs,
                [100 * v[j] for v in values],
                width,
                label=m,
                color=cmap(j % 10),
                hatch="//" if m == "mode_ensemble" else None,
            )
        chances = [1 / t["n_classes"] for t in results["tasks"].values()]
        chance_lines(ax, [*chances, float(np.mean(chances))])  # the average's: the tasks' mean
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_xlabel("task")
        ax.set_ylabel("zero-shot top-1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Experts, ensembles and single models per task")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save_figure(fig, out / "accuracy.png", bbox_inches="tight")
        written.append(out / "accuracy.png")

        fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(results["tasks"]) * n / 2), 3.5))
        names = list(results["tasks"])
        width = 0.8 / n
        for k in range(n):
            xs = np.arange(len(names)) + (k - (n - 1) / 2) * width
            ax.bar(xs, [results["tasks"][t]["expert_weights"][k] for t in names], width, label=f"expert_{k}")
        ax.axhline(1.0 / n, color="gray", lw=0.8, ls="--", label="uniform (mean)")
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_xlabel("task")
        ax.set_ylabel("MoDE weight")
        ax.set_title("Expert weights per task (from class names)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save_figure(fig, out / "expert_weights.png", bbox_inches="tight")
        written.append(out / "expert_weights.png")
    if results["retrieval"]:
        names = list(results["retrieval"])
        fig, ax = plt.subplots(figsize=(max(6, len(names) * len(methods) / 3), 4))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs = np.arange(len(names)) + (j - (len(methods) - 1) / 2) * width
            ax.bar(xs, [100 * results["retrieval"][t]["recall"][m]["mean_recall"] for t in names], width, label=m)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_xlabel("retrieval task")
        ax.set_ylabel("mean recall@1/5/10, both ways (%)")
        ax.set_title("Image-text retrieval")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save_figure(fig, out / "retrieval.png", bbox_inches="tight")
        written.append(out / "retrieval.png")
    return written


def clip_benchmark_records(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task and method, a record in CLIP_benchmark's result layout (the JSON its
    clip_benchmark/cli.py dumps and `clip_benchmark build` gathers into a CSV): dataset (the
    task's name), model (the method), pretrained (its checkpoint; the run folder for the
    ensembles), task (zeroshot_classification / zeroshot_retrieval), metrics, language.
    Classification metrics are acc1, acc5 (null under 5 classes, where CLIP_benchmark gives
    NaN) and mean_per_class_recall; retrieval ones image_retrieval_recall@K (text->image)
    and text_retrieval_recall@K (image->text). Keyed by file name, TASK__METHOD.json."""
    methods = method_order(results, results["n_experts"])
    checkpoints = results["experts"] | results["single_model_checkpoints"]
    records = {}

    def record(task: str, method: str, kind: str, metrics: dict[str, Any], best: str) -> None:
        pretrained = checkpoints.get(best if method == "best_expert" else method, results["run"])
        records[f"{path_key(task)}__{path_key(method)}.json"] = {
            "dataset": task,
            "model": method,
            "pretrained": pretrained,
            "task": kind,
            "metrics": metrics,
            "language": CB_LANGUAGE,
        }

    for name, t in results["tasks"].items():
        for m in methods:
            metrics = {
                "acc1": t["top1"][m],
                "acc5": t["top5"][m] if t["n_classes"] >= 5 else None,
                "mean_per_class_recall": t["mean_per_class_recall"][m],
            }
            record(name, m, "zeroshot_classification", metrics, t["best_expert"])
    for name, t in results["retrieval"].items():
        for m in methods:
            r = t["recall"][m]
            metrics = {f"image_retrieval_recall@{k}": r[f"text_to_image_R@{k}"] for k in RECALL_KS}
            metrics |= {f"text_retrieval_recall@{k}": r[f"image_to_text_R@{k}"] for k in RECALL_KS}
            record(name, m, "zeroshot_retrieval", metrics, t["best_expert"])
    return records


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    """Every result file under `out`; returns the CLIP_benchmark records written."""
    out.mkdir(parents=True, exist_ok=True)
    plot_results(results, out)
    with atomic_write(out / "results.md", "w") as f:
        f.write(markdown_table(results))
    written = []
    for filename, rec in clip_benchmark_records(results).items():
        write_json(out / CB_DIR / filename, rec)
        written.append(out / CB_DIR / filename)
    write_json(out / "results.json", results)  # last: its presence marks a finished evaluation
    return written


# --------------------------------------------------------------------------- statistics for reports
def paired_difference(a_correct: Any, b_correct: Any) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error) for two methods scored on the same images:
    the SE of the mean per-image difference (paired), std(d, ddof=1) / sqrt(n)."""
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_difference needs two equal-length 1-D score lists, got {a.shape} and {b.shape}")
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def proportion_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent images."""
    return float(np.sqrt(p * (1 - p) / n)) if n > 0 else float("nan")


def cluster_agreement(truth: Any, clusters: Any) -> dict[str, Any]:
    """How well clusters recover known groups: purity (the share of items in their cluster's
    majority group), adjusted mutual information (scikit-learn's; None without it) and the
    contingency table (clusters x groups, groups in sorted order)."""
    truth = np.asarray(truth)
    clusters = np.asarray(clusters)
    if truth.shape != clusters.shape or truth.ndim != 1 or len(truth) == 0:
        raise ValueError("cluster_agreement needs two equal-length non-empty 1-D label lists")
    groups, t = np.unique(truth, return_inverse=True)
    ids, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((len(ids), len(groups)), dtype=np.int64)
    np.add.at(table, (c, t), 1)
    try:
        from sklearn.metrics import adjusted_mutual_info_score
    except ImportError:
        ami = None
    else:
        ami = float(adjusted_mutual_info_score(t, c))
    return {
        "purity": float(table.max(1).sum() / len(truth)),
        "ami": ami,
        "groups": [str(g) for g in groups],
        "clusters": [int(i) if np.issubdtype(ids.dtype, np.integer) else str(i) for i in ids],
        "contingency": table.tolist(),
    }
