"""The demo's report: what `python -m mode_fast.demo.pipeline` measures and how it says it.

From a finished demo folder (sample/, dedup/, curated/, clusters/, eval/ results): how the
deduplication before curation did against the sample's own record of its near-duplicates
(`dedup_score`), the curation's
entry counts before and after (MetaCLIP's flattened head, kept tail), the experts'
agreement with the sample's visual domains, each expert per domain task, MoDE's weights,
the paired comparisons with two single models: MoDE's own (the paper's: one model trained on
all the data with the same schedule as one expert, the seed continued on all the data) and
ours besides (one model of the whole ensemble's training compute); then summary.md
(worded from the measured numbers, whichever way they go) and the figures. Library
module: the demo job (`mode_fast.demo.pipeline`) calls it; it never imports a job module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.evaluation.results import (
    chance_lines,
    cluster_agreement,
    ensemble_note,
    markdown_table,
    paired_difference,
    proportion_se,
    pyplot,
    save_figure,
)


# --------------------------------------------------------------------------- the summary
def captioned_records(shards: list[Path]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, caption, .json fields) of every captioned sample in the shards."""
    from mode_fast.data.io import read_shard

    out = []
    for shard in shards:
        for rec in read_shard(shard, "caption"):
            if rec.caption is None:
                continue
            meta = json.loads(rec.sample["json"]) if "json" in rec.sample else {}
            out.append((rec.key, rec.caption, meta))
    return out


def dedup_score(pool: dict[str, str | None], kept: set[str]) -> dict[str, Any]:
    """Deduplication against the sample's injected near-duplicates. `pool`: every pool key ->
    the key of the record it is a near-duplicate of (the sample's ``near_duplicate_of``), or
    None; `kept`: the keys dedup kept. Removed = the pool's keys not kept.

    A pair is an injected near-duplicate and its original. A removed record is right when it
    is an injected near-duplicate, or the original of one whose near-duplicate was kept (either
    way one record of an injected pair went, which is all dedup can be asked for: SemDeDup
    keeps the first record of a group in its own order, not the older one); an original removed
    along with all its copies is one removal too many, so it counts as other. precision = right
    / removed; recall = injected pairs with at least one record removed / injected pairs;
    other_removed = removed - right: records removed for a similarity the sample did not
    inject (independently drawn captions that came out (nearly) the same). precision is None
    when nothing was removed, recall when nothing was injected."""
    removed = set(pool) - kept
    pairs = {copy: original for copy, original in pool.items() if original is not None and original in pool}
    kept_copy_of = {original for copy, original in pairs.items() if copy in kept}
    right = {key for key in removed if key in pairs or key in kept_copy_of}
    found = sum(copy in removed or original in removed for copy, original in pairs.items())
    return {
        "pool": len(pool),
        "kept": len(pool) - len(removed),
        "removed": len(removed),
        "injected_pairs": len(pairs),
        "injected_pairs_found": found,
        "right": len(right),
        "other_removed": len(removed) - len(right),
        "precision": len(right) / len(removed) if removed else None,
        "recall": found / len(pairs) if pairs else None,
    }


def dedup_summary(sample: Path, dedup_folder: Path, curated: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The dedup step's figures: `dedup_score` of its kept_keys.txt against the sample's
    near_duplicate_of fields (read from the pool's .json members), its eps and clusters, and
    whether the curation read its list (a demo folder whose curation predates the dedup step
    ran dedup alone: its curated pool is the one curated without it)."""
    from mode_fast.core.files import sha256_file
    from mode_fast.dedup.run import KEPT_KEYS, eps_folder

    kept_file = dedup_folder / eps_folder(settings["dedup_eps"]) / KEPT_KEYS
    kept = set(kept_file.read_text(encoding="utf-8").split())
    pool = {
        key: meta.get("near_duplicate_of")
        for key, _, meta in captioned_records(sorted((sample / "pool").glob("*.tar")))
    }
    recorded = json.loads((curated / "run.json").read_text(encoding="utf-8")).get("args", {})
    own = json.loads((kept_file.parent / "summary.json").read_text(encoding="utf-8"))  # dedup's, per stage
    return {
        "eps": settings["dedup_eps"],
        "clusters": settings["dedup_clusters"],
        "embedder": settings["embedder"],
        **dedup_score(pool, kept),
        "removed_exact": own.get("removed_exact"),
        "removed_semantic": own.get("removed_semantic"),
        "applied_to_curation": recorded.get("--keep-keys") == sha256_file(kept_file),
    }


def curation_summary(sample: Path, curated: Path) -> dict[str, Any]:
    """Entry counts before curation (curate's entry_count.npy over the pool, the records the
    dedup step removed left out) and after (the
    kept captions matched again with the same metadata): MetaCLIP flattens the head (entries
    matched more than t times come down to about t) and keeps the tail (entries at or under t
    keep every match)."""
    from mode_fast._matcher import Matcher
    from mode_fast.curation.metadata import load_metadata

    info = json.loads((curated / "summary.json").read_text(encoding="utf-8"))
    before = np.load(curated / "entry_count.npy").astype(np.int64)
    entries = load_metadata(None)
    kept = captioned_records(sorted((curated / "data").glob("*.tar")))
    _, ids = Matcher(entries).match_batch([c for _, c, _ in kept])
    after = np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(entries))
    t = float(info["t"])
    head, tail = before > t, (before > 0) & (before <= t)
    top = np.argsort(-before, kind="stable")[:10]
    kept_domains: dict[str, int] = {}
    for _, _, meta in kept:
        kept_domains[meta.get("domain", "?")] = kept_domains.get(meta.get("domain", "?"), 0) + 1
    return {
        "pool_pairs": int(info["pool_size"]),
        # records left out by --keep-keys (the dedup step's list): not counted in "before"
        "deduplicated_away": int(info.get("filtered_by_keep_keys", 0)),
        "matched_pairs": int(info["matched"]),
        "kept_pairs": len(kept),
        "t": t,
        "entries_matched": int((before > 0).sum()),
        "head": {
            "entries": int(head.sum()),
            "matches_before": int(before[head].sum()),
            "matches_after": int(after[head].sum()),
            "largest_after": int(after[head].max()) if head.any() else 0,
        },
        "tail": {
            "entries": int(tail.sum()),
            "matches_before": int(before[tail].sum()),
            "matches_after": int(after[tail].sum()),
            "share_of_matches_kept": float(after[tail].sum() / max(1, before[tail].sum())),
        },
        "top_entries": [{"entry": entries[i], "before": int(before[i]), "after": int(after[i])} for i in top],
        "kept_per_domain": dict(sorted(kept_domains.items())),
        "_counts": {"before": before, "after": after},  # for the plot; dropped before writing
    }


def clustering_summary(curated: Path, clusters: Path, domains: list[str]) -> dict[str, Any]:
    """Agreement of the experts with the sample's visual domains (each pair's image domain)."""
    from mode_fast.clustering.folder import ClusterFolder

    expert_of = ClusterFolder(clusters).expert_of_key()
    pairs = [
        (meta["domain"], expert_of[key])
        for key, _, meta in captioned_records(sorted((curated / "data").glob("*.tar")))
        if key in expert_of and "domain" in meta
    ]
    agree = cluster_agreement([d for d, _ in pairs], [e for _, e in pairs])
    table = np.asarray(agree["contingency"])  # experts (agree["clusters"]) x domains (agree["groups"])
    n_experts = max(agree["clusters"]) + 1
    by_expert = np.zeros((n_experts, len(domains)), dtype=np.int64)
    for row, k in zip(table, agree["clusters"]):
        for count, d in zip(row, agree["groups"]):
            by_expert[k, domains.index(d)] = count
    # a domain's expert: the one holding most of that domain's pairs
    domain_expert = {d: int(by_expert[:, j].argmax()) for j, d in enumerate(domains)}
    return {
        "domain_ami": agree["ami"],
        "domain_purity": agree["purity"],
        "n_pairs": len(pairs),
        "domains": domains,
        "pairs_per_expert_and_domain": by_expert.tolist(),
        "domain_expert": domain_expert,
        "majority_domain_of_expert": {
            f"expert_{k}": domains[int(by_expert[k].argmax())] for k in range(n_experts) if by_expert[k].sum()
        },
    }


def _diff(task: dict[str, Any], a: str, b: str) -> dict[str, float]:
    d, se = paired_difference(task["correct"][a], task["correct"][b])
    return {"diff": d, "se": se}


COMPARED = ("mean_ensemble", "best_expert", "same_schedule", "same_compute")
METHODS = ("mode_ensemble", "mean_ensemble", "best_expert", "same_schedule", "same_compute", "seed")
# The two single models the ensemble is compared with: which comparison each is, and who makes it.
SINGLE_MODELS = {
    "same_schedule": {
        "comparison": "MoDE's (the one the paper makes; Ma et al., CVPR 2024, arXiv:2404.16030)",
        "model": "one model trained on all the data with the same schedule as one expert: "
        "the seed continued on all the data for the experts' steps",
    },
    "same_compute": {
        "comparison": "ours, besides the paper's",
        "model": "one model trained on all the data for the whole ensemble's training steps (equal total compute)",
    },
}


def task_summary(t: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One eval task: (its chance, top-1 and standard errors; MoDE's paired differences)."""
    # best_expert is the oracle pick on this task: its per-image scores are that expert's
    correct = dict(t["correct"], best_expert=t["correct"][t["best_expert"]])
    t = dict(t, correct=correct)
    stats = {
        "n_images": t["n_images"],
        "n_classes": t["n_classes"],
        "chance": 1.0 / t["n_classes"],
        "top1": t["top1"],
        "se": {m: proportion_se(v, t["n_images"]) for m, v in t["top1"].items()},
        "best_expert": t["best_expert"],
        "mode_vs_mean_disagreements": int(
            sum(a != b for a, b in zip(t["correct"]["mode_ensemble"], t["correct"]["mean_ensemble"]))
        ),
    }
    return stats, {f"mode_ensemble - {b}": _diff(t, "mode_ensemble", b) for b in COMPARED}


def ensemble_summary(name: str, t: dict[str, Any], experts: list[str], domain_expert: dict[str, int]) -> dict[str, Any]:
    """MoDE's weights on one task, and whether the largest is the task's domain's expert."""
    w = np.asarray(t["expert_weights"])
    entry: dict[str, Any] = {
        "weights": w.tolist(),
        "largest": experts[int(w.argmax())],
        "classes_per_expert": t["classes_per_expert"],
    }
    if name in domain_expert:
        own = domain_expert[name]
        entry |= {"domain_expert": experts[own], "largest_is_domain_expert": int(w.argmax()) == own}
    return entry


def domain_average(comparison: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """The mean of the domain tasks' differences; the tasks hold disjoint images, so its SE
    combines theirs."""
    return {
        key: {
            "diff": float(np.mean([comparison[d][key]["diff"] for d in domains])),
            "se": float(np.sqrt(sum(comparison[d][key]["se"] ** 2 for d in domains)) / len(domains)),
        }
        for key in comparison[domains[0]]
    }


def build_summary(
    out: Path, settings: dict[str, Any], results: dict[str, Any], compute: dict[str, Any], timings: dict[str, Any]
) -> dict[str, Any]:
    """summary.json of the demo folder `out` (its sample/, curated/, clusters/ and the eval
    `results`); its curation section keeps the entry counts under "_counts" for the plot."""
    info = json.loads((out / "sample" / "sample_info.json").read_text(encoding="utf-8"))
    domains = list(info["domains"])
    experts = [f"expert_{k}" for k in range(results["n_experts"])]
    clustering = clustering_summary(out / "curated", out / "clusters", domains)
    tasks, comparison, ensemble = {}, {}, {}
    for name, t in results["tasks"].items():
        tasks[name], comparison[name] = task_summary(t)
        ensemble[name] = ensemble_summary(name, t, experts, clustering["domain_expert"])
    dom = [d for d in domains if d in comparison]
    if dom:
        comparison["domain_average"] = domain_average(comparison, dom)
    per_domain = {e: {d: results["tasks"][d]["top1"][e] for d in dom} for e in experts}
    steps = {"same_schedule": compute["same_schedule_model_steps"], "same_compute": compute["single_model_steps"]}
    singles = {
        m: {
            **about,
            "training_steps": steps[m],
            "average_top1": results["average"]["top1"][m],
            "mode_ensemble_average_top1": results["average"]["top1"]["mode_ensemble"],
            # paired over the same images, with its standard error (domain tasks: disjoint images)
            "mode_ensemble_minus_it": {task: comparison[task][f"mode_ensemble - {m}"] for task in comparison},
        }
        for m, about in SINGLE_MODELS.items()
    }
    own_best = {d: max(experts, key=lambda e: per_domain[e][d]) for d in dom}
    return {
        "settings": settings,
        "compute": compute,
        "ensemble_inputs": results.get("ensemble_inputs", "scaled"),
        "timings": timings["runs"][-1],
        "runs_recorded": len(timings["runs"]),
        "dedup": dedup_summary(out / "sample", out / "dedup", out / "curated", settings),
        "curation": curation_summary(out / "sample", out / "curated"),
        "clustering": clustering,
        "experts": {
            "top1_per_domain_task": per_domain,
            "best_expert_per_domain_task": own_best,
            "domain_expert_is_best": {d: own_best[d] == experts[clustering["domain_expert"][d]] for d in dom},
        },
        "ensemble": ensemble,
        "tasks": tasks,
        "comparison": comparison,
        "single_models": singles,
    }


# --------------------------------------------------------------------------- plots
FIG_WIDTH = 9.5  # inches; at 110 dpi about 1050 px, within a laptop screen


def plot_curation(cur: dict[str, Any], counts: dict[str, Any], path: Path) -> Path:
    """Entry counts by rank, before and after curation, with the threshold t."""
    plt = pyplot()
    before, after = counts["before"], counts["after"]
    order = np.argsort(-before, kind="stable")[: int((before > 0).sum())]
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 4.2), layout="constrained")
    ranks = np.arange(1, len(order) + 1)
    ax.loglog(ranks, before[order], ".", ms=3, color="tab:gray", label="before (pool)")
    ax.loglog(ranks, np.maximum(after[order], 0.8), ".", ms=3, color="tab:blue", label="after (kept; 0 drawn at 0.8)")
    ax.axhline(cur["t"], color="tab:red", ls="--", lw=1, label=f"t = {cur['t']:.1f}")
    ax.set_xlabel("metadata entry, by its count in the pool (rank)")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title(f"Curation: {cur['pool_pairs']:,} pairs -> {cur['kept_pairs']:,}; head (> t) flattened, tail kept")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


def _heatmap(table: Any, cmap: str, xlabels: list[str], ylabels: list[str], fmt: str, **imshow: Any) -> Any:
    """(fig, ax, image) of a labelled table, each cell printed on it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(table) + 2.2), layout="constrained")
    im = ax.imshow(table, cmap=cmap, aspect="auto", **imshow)
    for (i, j), v in np.ndenumerate(table):
        dark = im.norm(v) > 0.6
        ax.text(j, i, format(v, fmt), ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_yticks(range(len(ylabels)), ylabels)
    return fig, ax, im


def plot_clustering(cl: dict[str, Any], path: Path) -> Path:
    """Curated pairs per expert and visual domain."""
    table = np.asarray(cl["pairs_per_expert_and_domain"])
    fig, ax, im = _heatmap(table, "Blues", cl["domains"], [f"expert_{k}" for k in range(len(table))], "d")
    ax.set_xlabel("visual domain of the image")
    ax.set_ylabel("expert (coarse cluster)")
    ami = "n/a" if cl["domain_ami"] is None else f"{cl['domain_ami']:.2f}"
    ax.set_title(f"Curated pairs per expert and domain (AMI {ami}, purity {cl['domain_purity']:.2f})")
    fig.colorbar(im, ax=ax, label="pairs")
    return save_figure(fig, path)


def plot_experts(summary: dict[str, Any], path: Path) -> Path | None:
    """Each expert's top-1 on each domain task (None without domain tasks)."""
    per = summary["experts"]["top1_per_domain_task"]
    if not per or not next(iter(per.values())):
        return None
    names = list(per)
    doms = list(next(iter(per.values())))
    acc = np.array([[100 * per[e][d] for d in doms] for e in names])
    xlabels = [f"{d}\n(chance {100 * summary['tasks'][d]['chance']:.0f}%)" for d in doms]
    fig, ax, im = _heatmap(acc, "Greens", xlabels, names, ".1f", vmin=0, vmax=100)
    ax.set_xlabel("domain task")
    ax.set_ylabel("expert")
    ax.set_title("Each expert's zero-shot top-1 (%) on each domain's task")
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    return save_figure(fig, path)


def plot_comparison(tasks: dict[str, Any], path: Path) -> Path:
    """Every method's top-1 per task with its SE and the chance line."""
    plt = pyplot()
    methods = [m for m in METHODS if all(m in t["top1"] for t in tasks.values())]
    names = list(tasks)
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 4.4), layout="constrained")
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs = np.arange(len(names)) + (j - (len(methods) - 1) / 2) * width
        top1 = [100 * tasks[t]["top1"][m] for t in names]
        se = [100 * tasks[t]["se"][m] for t in names]
        ax.bar(xs, top1, width, yerr=se, capsize=2, label=m, color=cmap(j))
    chance_lines(ax, [tasks[t]["chance"] for t in names])
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 105)
    ax.set_xlabel("task")
    ax.set_ylabel("zero-shot top-1 (%), bars: ±1 SE")
    ax.set_title("MoDE ensemble vs mean, best expert, one expert's schedule (MoDE's) and equal compute (ours)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


def plot_ensemble(ens: dict[str, Any], path: Path) -> Path:
    """MoDE's expert weights per task against the uniform weights of the plain mean."""
    plt = pyplot()
    names = list(ens)
    n = len(next(iter(ens.values()))["weights"])
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 3.8), layout="constrained")
    width = 0.8 / n
    cmap = plt.get_cmap("tab10")
    for k in range(n):
        xs = np.arange(len(names)) + (k - (n - 1) / 2) * width
        ax.bar(xs, [ens[t]["weights"][k] for t in names], width, label=f"expert_{k}", color=cmap(k))
    ax.axhline(1.0 / n, color="gray", lw=0.8, ls="--", label="uniform (plain mean)")
    ax.set_xticks(
        np.arange(len(names)),
        [t + (f"\n(domain: {ens[t]['domain_expert']})" if "domain_expert" in ens[t] else "") for t in names],
    )
    ax.set_xlabel("task")
    ax.set_ylabel("MoDE weight")
    ax.set_title("MoDE's expert weights per task (from the class names through the templates)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


def plot_summary(summary: dict[str, Any], folder: Path) -> dict[str, Path]:
    """The summary's figures (titles, labelled axes, chance lines, legends outside the data).
    Takes the curation's entry counts out of `summary` ("_counts": not for summary.json)."""
    counts = summary["curation"].pop("_counts")
    plots = {
        "curation": plot_curation(summary["curation"], counts, folder / "curation.png"),
        "clustering": plot_clustering(summary["clustering"], folder / "clustering.png"),
        "experts": plot_experts(summary, folder / "experts.png"),
        "comparison": plot_comparison(summary["tasks"], folder / "comparison.png"),
        "ensemble": plot_ensemble(summary["ensemble"], folder / "ensemble_weights.png"),
    }
    return {k: p for k, p in plots.items() if p is not None}


# --------------------------------------------------------------------------- summary.md
def verdict(a: float, b: float) -> str:
    """a against b (fractions), judged at the 0.1-point precision the summary prints."""
    diff = round(100 * a, 1) - round(100 * b, 1)
    if abs(diff) < 0.05:
        return "ties with"
    return "beats" if diff > 0 else "loses to"


def _pm(d: dict[str, float]) -> str:
    return f"{100 * d['diff']:+.1f} ± {100 * d['se']:.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines (cells already formatted)."""
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *["| " + " | ".join(str(c) for c in row) + " |" for row in rows],
    ]


def _by(a: float, b: float) -> str:
    """ "by D points" at the printed precision (nothing for a tie)."""
    diff = abs(round(100 * a, 1) - round(100 * b, 1))
    return "" if verdict(a, b) == "ties with" else f" by {diff:.1f} points"


def _domain_diff(summary: dict[str, Any], model: str) -> str:
    """MoDE minus `model` on the domain tasks' average, ± its SE ("" without domain tasks)."""
    avg = summary["comparison"].get("domain_average")
    if avg is None:
        return ""
    return f"; MoDE minus it on the domain tasks' average {_pm(avg[f'mode_ensemble - {model}'])} points (± 1 SE)"


def _md_headline(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    avg = results["average"]["top1"]
    ens, one, paper, best = avg["mode_ensemble"], avg["same_compute"], avg["same_schedule"], avg["best_expert"]
    c, tm = summary["compute"], summary["timings"]
    ran = [x for x in tm["steps"] if not x.get("skipped")]
    skipped = [x["step"] for x in tm["steps"] if x.get("skipped")]
    return [
        "# mode-fast demo",
        "",
        f"This run: wall time {tm['wall_seconds']:.0f} s, {tm['cpu_seconds']:.0f} CPU-seconds in the steps' processes, "
        f"on {tm['cpu_count']} CPU cores (steps: "
        + (", ".join(f"{x['step']} {x['seconds']:.0f} s" for x in ran) or "none")
        + ")"
        + (f"; skipped as already done: {', '.join(skipped)}" if skipped else "")
        + ". "
        f"timings.json keeps all {summary['runs_recorded']} run(s).",
        "",
        f"MoDE: {results['n_experts']} experts, {c['ensemble_steps']} training steps of batch {c['batch_size']} "
        f"in all (seed + experts); each expert's weights saw {c['same_schedule_model_steps']} "
        f"(the seed's {c['same_schedule_model_steps'] - c['same_schedule_model_steps_after_seed']} and its own "
        f"{c['same_schedule_model_steps_after_seed']}). Two single models of the same architecture, on all the data: "
        f"same_schedule, the seed continued for the experts' {c['same_schedule_model_steps_after_seed']} steps "
        f"({c['same_schedule_model_steps']} steps, one expert's schedule), and same_compute, "
        f"{c['single_model_steps']} steps of batch {c['batch_size']} (the whole ensemble's). "
        f"{ensemble_note(results)}",
        "",
        f"Average zero-shot top-1 over {len(results['tasks'])} tasks, against each single model:",
        "",
        f"- **MoDE's comparison** (the one the paper makes, Ma et al., CVPR 2024: a model trained on all the data "
        f"with the same schedule as one expert): **the MoDE ensemble ({100 * ens:.1f}%) {verdict(ens, paper)} "
        f"the seed continued on all the data ({100 * paper:.1f}%){_by(ens, paper)}**{_domain_diff(summary, 'same_schedule')}.",
        f"- **Ours besides, at equal total training compute** (not in the paper): **the MoDE ensemble "
        f"({100 * ens:.1f}%) {verdict(ens, one)} the single model of equal training compute ({100 * one:.1f}%)"
        f"{_by(ens, one)}**{_domain_diff(summary, 'same_compute')}.",
        "",
        f"Plain mean of experts {100 * avg['mean_ensemble']:.1f}%, best expert per task {100 * best:.1f}%, "
        f"seed {100 * avg['seed']:.1f}%. The ensemble costs {c['ensemble_inference_forward_passes']} forward "
        "passes per image at inference, each single model 1.",
        "",
    ]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def dedup_line(d: dict[str, Any]) -> str:
    """One line: removed, precision, recall, other pairs removed (the demo prints it too)."""
    return (
        f"dedup (eps {d['eps']:g}): removed {d['removed']:,} of {d['pool']:,} pool pairs; against the "
        f"sample's {d['injected_pairs']} injected near-duplicates precision {_pct(d['precision'])}, "
        f"recall {_pct(d['recall'])}; {d['other_removed']:,} other pairs removed"
    )


def _md_dedup(d: dict[str, Any]) -> list[str]:
    applied = (
        "The curation below reads its kept list (`curate --keep-keys`)."
        if d["applied_to_curation"]
        else "**This folder's curation predates the dedup step, so it did not read its list: the curated "
        "pool below is not deduplicated** (`--overwrite` runs the whole demo with it)."
    )
    return [
        "## Deduplication (SemDeDup, before curation)",
        "",
        f"`mode-fast dedup` on the pool: the exact stage (image bytes), then SemDeDup on the captions' "
        f"{d['embedder']} embeddings in {d['clusters']} k-means clusters, a pair removed when its cosine "
        f"similarity exceeds 1 - eps = {1 - d['eps']:g}. It removed **{d['removed']:,} of {d['pool']:,}** pool "
        f"pairs"
        + (
            f" ({d['removed_exact']:,} exact, {d['removed_semantic']:,} semantic)"
            if d.get("removed_exact") is not None
            else ""
        )
        + f". Against the sample's own record of what it duplicated ({d['injected_pairs']} injected "
        f"near-duplicates, each a tiny edit of an earlier caption with a new image): **precision "
        f"{_pct(d['precision'])}** ({d['right']} removals are an injected near-duplicate or the original of one "
        f"whose copy was kept), **recall {_pct(d['recall'])}** ({d['injected_pairs_found']} injected pairs lost "
        f"a record); **{d['other_removed']:,} other pairs removed** (captions drawn independently that came "
        f"out nearly the same). {applied}",
        "",
    ]


def _md_curation(cur: dict[str, Any]) -> list[str]:
    head, tail = cur["head"], cur["tail"]
    away = cur.get("deduplicated_away", 0)
    return [
        "## Curation (MetaCLIP)",
        "",
        f"{cur['pool_pairs']:,} pool pairs"
        + (
            f" ({away:,} removed by dedup first; the counts below are over the other {cur['pool_pairs'] - away:,})"
            if away
            else ""
        )
        + f", {cur['matched_pairs']:,} matching a metadata entry, "
        f"{cur['kept_pairs']:,} kept (t = {cur['t']:.1f}). Head: {head['entries']} entries matched more than "
        f"t times had {head['matches_before']:,} matches, {head['matches_after']:,} after "
        f"(largest {head['largest_after']}). Tail: {tail['entries']} entries matched at most t times "
        f"had {tail['matches_before']:,} matches, {tail['matches_after']:,} after "
        f"({100 * tail['share_of_matches_kept']:.0f}% kept). Kept pairs per domain: "
        + ", ".join(f"{d} {v}" for d, v in cur["kept_per_domain"].items())
        + ".",
        "",
        *_table(
            ["entry", "pairs before", "pairs after"],
            [[e["entry"], e["before"], e["after"]] for e in cur["top_entries"]],
        ),
        "",
    ]


def _md_clustering(cl: dict[str, Any]) -> list[str]:
    ami = "n/a (scikit-learn not installed)" if cl["domain_ami"] is None else f"{cl['domain_ami']:.3f}"
    rows = [[f"expert_{k}", *row] for k, row in enumerate(cl["pairs_per_expert_and_domain"])]
    return [
        "## Clustering: do the experts follow the visual domains?",
        "",
        f"Over {cl['n_pairs']:,} curated pairs (clustered by caption only): adjusted mutual information with the "
        f"image's domain {ami}, purity {cl['domain_purity']:.3f} (1 = each expert holds one domain). "
        "Each domain's expert (the one holding most of its pairs): "
        + ", ".join(f"{d} -> expert_{k}" for d, k in cl["domain_expert"].items())
        + ".",
        "",
        *_table(["expert", *cl["domains"]], rows),
        "",
    ]


def _md_experts(summary: dict[str, Any]) -> list[str]:
    per = summary["experts"]["top1_per_domain_task"]
    doms = list(next(iter(per.values()))) if per else []
    if not doms:
        return []
    best = summary["experts"]["domain_expert_is_best"]
    return [
        "## Experts: does each specialise?",
        "",
        "Zero-shot top-1 (%) of each expert on each domain's task (chance "
        + ", ".join(f"{d} {100 * summary['tasks'][d]['chance']:.0f}%" for d in doms)
        + "). "
        "The domain's own expert is the best expert on: "
        + ", ".join(f"{d} {'yes' if v else 'no'}" for d, v in best.items())
        + ".",
        "",
        *_table(["expert", *doms], [[e, *(f"{100 * per[e][d]:.1f}" for d in doms)] for e in per]),
        "",
    ]


def _md_ensemble(en: dict[str, Any], n: int) -> list[str]:
    rows = []
    for t, e in en.items():
        own = (
            [e["domain_expert"], "yes" if e["largest_is_domain_expert"] else "no"]
            if "domain_expert" in e
            else ["-", "-"]
        )
        rows.append([t, *(f"{w:.3f}" for w in e["weights"]), e["largest"], *own])
    header = ["task", *(f"expert_{k}" for k in range(n)), "largest", "domain's expert", "match"]
    return ["## Ensemble: MoDE's weights per task", "", *_table(header, rows), ""]


def _md_comparison(summary: dict[str, Any]) -> list[str]:
    tasks, cmp_ = summary["tasks"], summary["comparison"]
    header = ["task", "chance", *METHODS, *(f"MoDE - {b.replace('_', ' ')}" for b in COMPARED), "mode != mean"]
    rows = [
        [
            t,
            f"{100 * v['chance']:.0f}",
            *(f"{100 * v['top1'][m]:.1f} ± {100 * v['se'][m]:.1f}" for m in METHODS),
            *(_pm(cmp_[t][f"mode_ensemble - {b}"]) for b in COMPARED),
            f"{v['mode_vs_mean_disagreements']} of {v['n_images']}",
        ]
        for t, v in tasks.items()
    ]
    table = _table(header, rows)
    if "domain_average" in cmp_:
        avg = [_pm(cmp_["domain_average"][f"mode_ensemble - {b}"]) for b in COMPARED]
        table.append("| domain tasks' average |" + " |" * (1 + len(METHODS)) + " " + " | ".join(avg) + " | |")
    return [
        "## Comparison",
        "",
        "Top-1 (%) ± its standard error; differences are MoDE ensemble minus the other, paired over the same "
        "images, ± their standard error. best_expert is an oracle (the expert that scored best on that task). "
        "same_schedule is MoDE's comparison (the paper's: all the data, one expert's schedule); same_compute is "
        "ours besides (all the data, the whole ensemble's training steps). "
        "\"mode != mean\" counts the images where MoDE's and the plain mean's correctness differ.",
        "",
        *table,
    ]


def _md_digits(digits: dict[str, Any]) -> str:
    """The sklearn digits eval, reported apart from the headline average."""
    t = next(iter(digits["tasks"].values()))
    top1 = t["top1"]
    at_chance = max(top1.values()) < 1 / t["n_classes"] + 0.03
    return "\n".join(
        [
            "",
            "## Real data: scikit-learn's handwritten digits",
            "",
            f"{t['n_images']} images of {t['n_classes']} classes ({t['source']}; chance {100 / t['n_classes']:.0f}%), "
            f"never seen in training (the sample has only the digits one and seven, typeset). Zero-shot top-1: "
            f"the MoDE ensemble ({100 * top1['mode_ensemble']:.1f}%) "
            f"{verdict(top1['mode_ensemble'], top1['same_schedule'])} the seed continued on all the data "
            f"(MoDE's comparison, {100 * top1['same_schedule']:.1f}%) and "
            f"{verdict(top1['mode_ensemble'], top1['same_compute'])} the single model of equal "
            f"training compute ({100 * top1['same_compute']:.1f}%); mean of experts "
            f"{100 * top1['mean_ensemble']:.1f}%, best expert {100 * top1['best_expert']:.1f}%, seed "
            f"{100 * top1['seed']:.1f}%."
            + (
                " Every model is within 3 points of chance: these toy models have not learned handwritten "
                "digits, so this task cannot rank them."
                if at_chance
                else ""
            ),
            "",
            markdown_table(digits),
        ]
    )


def summary_markdown(
    results: dict[str, Any],
    summary: dict[str, Any],
    digits: dict[str, Any] | None = None,
    plots: dict[str, Path] | None = None,
) -> str:
    """The demo's report, worded from the measured numbers whichever way they go;
    `digits`: the sklearn digits eval's results, reported on their own; `plots`: the
    figures to show (key -> path), with "_base" the folder the links are relative to."""
    plots = plots or {}

    def img(key: str, alt: str) -> list[str]:
        if key not in plots:
            return []
        return [f"![{alt}]({os.path.relpath(plots[key], plots['_base']) if '_base' in plots else plots[key]})", ""]

    lines = [
        *_md_headline(results, summary),
        *(_md_dedup(summary["dedup"]) if "dedup" in summary else []),
        *_md_curation(summary["curation"]),
        *img("curation", "entry counts before and after curation"),
        *_md_clustering(summary["clustering"]),
        *img("clustering", "pairs per expert and domain"),
    ]
    experts = _md_experts(summary)
    lines += [*experts, *(img("experts", "expert accuracy per domain") if experts else [])]
    lines += [*_md_ensemble(summary["ensemble"], results["n_experts"]), *img("ensemble", "MoDE weights per task")]
    lines += [*_md_comparison(summary), "", *img("comparison", "comparison with chance lines")]
    text = "\n".join([*lines, "## Every model on every task", ""]) + markdown_table(results)
    if digits is not None:
        text += _md_digits(digits)
    elif summary.get("digits"):
        text += f"\nDigits (real data): {summary['digits']}.\n"
    return text
