"""The end-to-end demo (`mode-fast demo --quick`) on a tiny sample: every step
runs through the CLI; dedup removes the sample's near-duplicates before curate (scored against
the sample's own record of them); MoDE's comparison model is the seed continued on all the data for the
experts' steps, the other single model gets the ensemble's training compute; a rerun resumes,
a demo finished before the same-schedule model existed runs only that model's step, and one
curated before the dedup step runs only dedup."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from mode_fast import cli
from mode_fast.demo import pipeline, report

torch.set_num_threads(1)  # shared 2-core machine


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    return out


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_demo_runs_every_step_and_reports(demo):
    s = pipeline.QUICK
    timings = json.loads((demo / "timings.json").read_text())
    names = [x["step"] for x in timings["runs"][0]["steps"]]
    assert not any(x.get("skipped") for x in timings["runs"][0]["steps"])
    assert all(x["cpu_seconds"] >= 0 and x["seconds"] > 0 for x in timings["runs"][0]["steps"])
    assert names[:5] == ["sample", "dedup", "curate", "cluster", "train seed"]
    assert [n for n in names if n.startswith("train expert")] == [f"train expert {k}" for k in range(s.experts)]
    assert names[-2:] == ["eval", "eval digits"]  # scikit-learn is in the dev environment
    results = json.loads((demo / "eval" / "results.json").read_text())
    assert list(results["tasks"]) == ["all16", "shapes", "textures", "glyphs", "scenes"]
    assert results["single_models"] == ["seed", "same_compute", "same_schedule"]
    assert "captions" in results["retrieval"]
    for png in ("accuracy.png", "expert_weights.png", "retrieval.png"):
        assert (demo / "eval" / png).stat().st_size > 1000
    # the summary states the measured comparison, whichever way it went
    avg = results["average"]["top1"]
    text = (demo / "summary.md").read_text()
    assert f"MoDE ensemble ({100 * avg['mode_ensemble']:.1f}%)" in text
    assert f"equal training compute ({100 * avg['same_compute']:.1f}%)" in text
    diff = round(100 * avg["mode_ensemble"], 1) - round(100 * avg["same_compute"], 1)
    assert ("beats" if diff > 0.05 else "loses to" if diff < -0.05 else "ties with") in text


def test_summary_json_holds_every_section(demo):
    """Issue 16: summary.json holds curation, clustering (domain_ami), experts, ensemble and the
    comparison; each task has its chance level and every model's top-1."""
    s = pipeline.QUICK
    summary = json.loads((demo / "summary.json").read_text())
    results = json.loads((demo / "eval" / "results.json").read_text())
    assert summary["ensemble_inputs"] == "cosine"
    for name, task in summary["tasks"].items():
        assert task["chance"] == pytest.approx(1 / results["tasks"][name]["n_classes"])
        assert task["top1"] == results["tasks"][name]["top1"]
        assert {"mode_ensemble", "mean_ensemble", "best_expert", "same_compute", "same_schedule", "seed"} <= set(
            task["top1"]
        )
    assert summary["tasks"]["shapes"]["chance"] == 0.25 and summary["tasks"]["all16"]["chance"] == 1 / 16
    cur = summary["curation"]
    assert cur["pool_pairs"] == s.num_pairs and cur["kept_pairs"] == s.target_size
    assert cur["head"]["matches_after"] <= cur["head"]["matches_before"]
    # the tail is kept: every pair matching an entry at or under t is kept
    assert cur["tail"]["matches_after"] == cur["tail"]["matches_before"]
    assert sum(cur["kept_per_domain"].values()) == s.target_size
    cl = summary["clustering"]
    assert -1 <= cl["domain_ami"] <= 1 and 0.25 <= cl["domain_purity"] <= 1
    assert sum(map(sum, cl["pairs_per_expert_and_domain"])) == cl["n_pairs"] == s.target_size
    assert set(summary["experts"]["top1_per_domain_task"]) == {f"expert_{k}" for k in range(s.experts)}
    for d in ("shapes", "textures", "glyphs", "scenes"):
        e = summary["ensemble"][d]
        assert len(e["weights"]) == s.experts and sum(e["weights"]) == pytest.approx(1.0)
        assert e["largest_is_domain_expert"] == (e["largest"] == e["domain_expert"])
    for name, diffs in summary["comparison"].items():
        for b in ("mean_ensemble", "best_expert", "same_schedule", "same_compute"):
            assert diffs[f"mode_ensemble - {b}"]["se"] >= 0
        if name in summary["tasks"]:
            t = summary["tasks"][name]["top1"]
            assert diffs["mode_ensemble - same_compute"]["diff"] == pytest.approx(
                t["mode_ensemble"] - t["same_compute"]
            )
    text = (demo / "summary.md").read_text()
    for heading in ("## Curation", "## Clustering", "## Experts", "## Ensemble", "## Comparison"):
        assert heading in text
    assert f"adjusted mutual information with the image's domain {cl['domain_ami']:.3f}" in text
    from PIL import Image

    for png in ("curation", "clustering", "experts", "comparison", "ensemble_weights"):
        with Image.open(demo / "report" / f"{png}.png") as im:
            assert 300 < im.size[0] <= 1200, (png, im.size)  # fits a laptop screen


def test_curation_counts_match_curates_own(demo):
    """The summary's re-matching of captions agrees with curate's counts on the pool that
    dedup kept (the records curate's --keep-keys lists)."""
    import numpy as np

    from mode_fast._matcher import Matcher
    from mode_fast.curation.metadata import load_metadata

    entries = load_metadata(None)
    pool = report.captioned_records(sorted((demo / "sample" / "pool").glob("*.tar")))
    kept = set(pipeline.dedup_kept_keys(demo, pipeline.QUICK).read_text().split())
    assert len(kept) < len(pool)
    _, ids = Matcher(entries).match_batch([c for k, c, _ in pool if k in kept])
    np.testing.assert_array_equal(
        np.bincount(ids, minlength=len(entries)), np.load(demo / "curated" / "entry_count.npy")
    )


def test_progress_bars_become_lines_when_not_on_a_terminal(monkeypatch, capsys):
    """A step's carriage-return updates come out as whole lines, at most one per interval."""
    import subprocess
    import sys

    monkeypatch.setattr(pipeline, "PROGRESS_EVERY", 3600.0)
    script = "import sys\nfor i in range(5): sys.stdout.write(f'bar {i}\\r')\nprint('done')"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    pipeline._relay(proc, tty=False)
    proc.wait()
    assert capsys.readouterr().out == "bar 0\ndone\n"


def test_verdict_is_judged_at_the_printed_precision():
    # 10.13% vs 10.07% both print as 10.1%: a tie, not "10.1% beats 10.1%"
    assert report.verdict(0.1013, 0.1007) == "ties with"
    assert report.verdict(0.440, 0.434) == "beats"
    assert report.verdict(0.434, 0.440) == "loses to"


def test_demo_scores_sklearn_digits_apart_from_the_headline(demo):
    s = pipeline.QUICK
    digits = json.loads((demo / "eval_digits" / "results.json").read_text())
    assert list(digits["tasks"]) == ["digits"] and digits["single_models"] == ["seed", "same_compute", "same_schedule"]
    task = digits["tasks"]["digits"]
    assert task["source"] == f"sklearn:digits:{s.digits}"
    assert (task["n_images"], task["n_classes"]) == (s.digits, 10)
    assert all(0 <= v <= 1 for v in task["top1"].values())
    # the headline average stays on the sample's tasks; the digits get their own paragraph
    results = json.loads((demo / "eval" / "results.json").read_text())
    assert "digits" not in results["tasks"]
    text = (demo / "summary.md").read_text()
    top1 = task["top1"]
    assert "## Real data: scikit-learn's handwritten digits" in text
    assert f"the MoDE ensemble ({100 * top1['mode_ensemble']:.1f}%)" in text
    assert f"equal training compute ({100 * top1['same_compute']:.1f}%)" in text
    assert "| digits |" in text
    assert json.loads((demo / "timings.json").read_text())["digits"] == f"scored sklearn:digits:{s.digits}"


def test_demo_without_sklearn_skips_the_digits_with_a_note(demo, tmp_path, monkeypatch, capsys):
    """Everything trained already (a rerun), scikit-learn hidden: the digits step is skipped."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo, out, ignore=shutil.ignore_patterns("eval_digits"))
    monkeypatch.setattr(pipeline, "have_sklearn", lambda: False)
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    timings = json.loads((out / "timings.json").read_text())
    assert [x["step"] for x in timings["runs"][-1]["steps"]][-1] == "eval"
    assert timings["digits"].startswith("skipped: scikit-learn is not installed")
    assert "note: eval digits skipped: scikit-learn is not installed" in capsys.readouterr().out
    assert not (out / "eval_digits").exists()
    text = (out / "summary.md").read_text()
    assert "Digits (real data): skipped" in text and "## Real data" not in text


def test_single_model_has_the_ensembles_training_compute(demo):
    s = pipeline.QUICK
    seed = ckpt(demo / "run" / "seed" / "checkpoints" / "final.pt")
    experts = [ckpt(demo / "run" / f"expert_{k}" / "checkpoints" / "final.pt") for k in range(s.experts)]
    single = ckpt(demo / "single" / "seed" / "checkpoints" / "final.pt")
    ensemble_steps = seed["job_steps"] + sum(e["job_steps"] for e in experts)
    assert single["job_steps"] == ensemble_steps == s.seed_steps + s.experts * s.expert_steps
    batches = {c["config"]["global_batch"] for c in [seed, single, *experts]}
    assert batches == {s.batch_size}
    assert {c["model_name"] for c in [seed, single, *experts]} == {"mode-fast-tiny"}
    for e in experts:  # experts finish the seed's schedule (MoDE's fork)
        assert e["schedule_step"] == e["schedule_total"] == seed["schedule_total"]


def test_domain_tasks_hold_the_right_images(demo):
    info = json.loads((demo / "sample" / "sample_info.json").read_text())
    for domain, labels in info["domains"].items():
        classes = json.loads((demo / "tasks" / domain / "classes.json").read_text())
        assert classes == [info["classes"][i] for i in labels]
        with tarfile.open(next((demo / "tasks" / domain).glob("*.tar"))) as tf:
            cls = [int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")]
        assert len(cls) == sum(info["eval_per_class"][i] for i in labels)
        assert set(cls) <= set(range(len(labels)))


def test_rerun_skips_finished_training(demo, capsys):
    before = ckpt(demo / "run" / "expert_0" / "checkpoints" / "final.pt")["state_dict"]
    runs_before = json.loads((demo / "timings.json").read_text())["runs"]
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(demo), "--quick"]) == 0
    runs = json.loads((demo / "timings.json").read_text())["runs"]
    assert runs[: len(runs_before)] == runs_before and len(runs) == len(runs_before) + 1  # appended
    steps = runs[-1]["steps"]
    ran = [x["step"] for x in steps if not x.get("skipped")]
    assert not [n for n in ran if n.startswith("train") or n in ("sample", "curate", "cluster", "eval")]
    assert {"sample", "dedup", "curate", "cluster", "train seed", "eval"} <= {
        x["step"] for x in steps if x.get("skipped")
    }
    printed = capsys.readouterr().out
    assert "skip: train seed: already done" in printed and "skip: cluster: already done" in printed
    assert "skipped as already done: sample, dedup, curate, cluster, train seed" in (demo / "summary.md").read_text()
    after = ckpt(demo / "run" / "expert_0" / "checkpoints" / "final.pt")["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_demo_run_json_records_the_result_flags_its_config_declares(demo):
    """The demo's parser comes from DemoConfig, and run.json's arguments hold the flags it
    declares result-changing (plus the settings they pick)."""
    import argparse

    from mode_fast.core.config import add_arguments, config_from_args, result_flags

    parser = argparse.ArgumentParser()
    add_arguments(parser, pipeline.DemoConfig)
    cfg = config_from_args(pipeline.DemoConfig, parser.parse_args(["--out", str(demo), "--quick"]))
    assert cfg.settings == pipeline.QUICK
    args = json.loads((demo / "run.json").read_text())["args"]
    assert result_flags(pipeline.DemoConfig) == {"--quick"}
    # settings added with the dedup step are recorded only off their defaults (older folders match)
    assert set(args) == {"--quick", *pipeline.dataclasses.asdict(pipeline.QUICK)} - set(pipeline.ADDED_SETTINGS)


def test_same_schedule_model_is_the_seed_continued_on_all_the_data(demo):
    """MoDE's comparison model (Ma et al. 2024): the seed's final state continued for the
    experts' steps, at the same schedule position as every expert, on every curated pair."""
    s = pipeline.QUICK
    job = demo / "same_schedule" / "expert_0"
    seed = ckpt(demo / "run" / "seed" / "checkpoints" / "final.pt")
    expert = ckpt(demo / "run" / "expert_0" / "checkpoints" / "final.pt")
    paper = ckpt(pipeline.same_schedule_checkpoint(demo))
    assert seed["schedule_step"] == s.seed_steps and seed["schedule_total"] == s.seed_steps + s.expert_steps
    # one expert's schedule: the seed's steps, then the experts' steps, to the schedule's end
    assert paper["job_steps"] == expert["job_steps"] == s.expert_steps
    assert paper["schedule_step"] == paper["schedule_total"] == seed["schedule_total"] == s.seed_steps + s.expert_steps
    assert paper["config"]["global_batch"] == s.batch_size and paper["model_name"] == seed["model_name"]
    # it started from the seed's final checkpoint (the one the experts forked), as its run.json records
    inputs = json.loads((job / "run.json").read_text())["inputs"]
    assert inputs["seed checkpoint"]["path"] == str(demo / "run" / "seed" / "checkpoints" / "final.pt")
    # ... at the experts' schedule position: the same learning rates, step by step
    lrs = [
        [json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (job, demo / "run" / "expert_0")
    ]
    assert lrs[0] == lrs[1] and len(lrs[0]) == s.expert_steps
    # all the data: every curated pair (read from the curated shards), where an expert has a part
    curated = {key for key, _, _ in report.captioned_records(sorted((demo / "curated" / "data").glob("*.tar")))}
    assert len(curated) == s.target_size
    assert json.loads((job / "data.json").read_text())["samples"] == len(curated)
    assert json.loads((demo / "run" / "expert_0" / "data.json").read_text())["samples"] < len(curated)
    # trained, not a copy of the seed
    assert any(not torch.equal(seed["state_dict"][k], paper["state_dict"][k]) for k in seed["state_dict"])


def test_summary_reports_both_comparisons_and_names_modes(demo):
    """summary.json: both single models, which comparison each is, MoDE minus each with its
    standard error; summary.md names MoDE's comparison as the paper's, then ours."""
    s = pipeline.QUICK
    summary = json.loads((demo / "summary.json").read_text())
    results = json.loads((demo / "eval" / "results.json").read_text())
    singles = summary["single_models"]
    assert list(singles) == ["same_schedule", "same_compute"]
    assert singles["same_schedule"]["training_steps"] == s.seed_steps + s.expert_steps
    assert singles["same_compute"]["training_steps"] == s.seed_steps + s.experts * s.expert_steps
    assert singles["same_schedule"]["comparison"].startswith("MoDE's (the one the paper makes")
    for name, single in singles.items():
        assert single["average_top1"] == results["average"]["top1"][name]
        assert set(single["mode_ensemble_minus_it"]) == {*results["tasks"], "domain_average"}
        for task, d in single["mode_ensemble_minus_it"].items():
            assert d["se"] >= 0
            if task in results["tasks"]:  # paired over the same images: the difference of the top-1s
                t = results["tasks"][task]
                assert d["diff"] == pytest.approx(t["top1"]["mode_ensemble"] - t["top1"][name])
                n, a, b = t["n_images"], t["correct"]["mode_ensemble"], t["correct"][name]
                diffs = [x - y for x, y in zip(a, b)]
                mean = sum(diffs) / n
                ref_se = (sum((x - mean) ** 2 for x in diffs) / (n - 1) / n) ** 0.5  # the paired SE, by hand
                assert d["se"] == pytest.approx(ref_se)
    assert summary["compute"]["same_schedule_model_steps"] == s.seed_steps + s.expert_steps
    avg = results["average"]["top1"]
    text = (demo / "summary.md").read_text()
    dom = summary["comparison"]["domain_average"]["mode_ensemble - same_schedule"]
    assert "**MoDE's comparison** (the one the paper makes" in text
    assert f"the seed continued on all the data ({100 * avg['same_schedule']:.1f}%)" in text
    assert f"{100 * dom['diff']:+.1f} ± {100 * dom['se']:.1f} points" in text
    assert "**Ours besides, at equal total training compute** (not in the paper)" in text
    assert text.index("MoDE's comparison") < text.index("Ours besides")
    table = text.split("## Comparison")[1]
    assert "| same_schedule | same_compute |" in table and "| MoDE - same schedule | MoDE - same compute |" in table


def test_a_demo_finished_before_the_same_schedule_model_runs_only_that_step(demo, capsys):
    """An older demo folder (no same-schedule model; its evals without it) under the same
    settings: the rerun trains only the new model, and the evals score only it."""
    state = json.loads((demo / "run.json").read_text())
    del state["units"]["train same-schedule single model"]
    (demo / "run.json").write_text(json.dumps(state))
    for ev in ("eval", "eval_digits"):  # as an eval without --baseline same_schedule wrote it
        run = json.loads((demo / ev / "run.json").read_text())
        run["args"]["--baseline"] = [b for b in run["args"]["--baseline"] if not b.startswith("same_schedule=")]
        del run["inputs"]["model same_schedule"]
        for unit in [u for u in run["units"] if u.endswith(":same_schedule")]:
            for f in run["units"].pop(unit):
                (demo / ev / f).unlink()
        (demo / ev / "run.json").write_text(json.dumps(run))
    import shutil

    shutil.rmtree(demo / "same_schedule")
    kept = {p: p.stat().st_mtime_ns for p in (demo / "eval" / "scores").rglob("model-*.npz")}
    assert kept and cli.main(["demo", "--out", str(demo), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "finished before this mode-fast added train same-schedule single model: running it" in printed
    steps = json.loads((demo / "timings.json").read_text())["runs"][-1]["steps"]
    ran = [x["step"] for x in steps if not x.get("skipped")]
    assert ran == ["train same-schedule single model", "eval", "eval digits"]
    assert pipeline.same_schedule_checkpoint(demo).is_file()
    assert all(p.stat().st_mtime_ns == m for p, m in kept.items())  # the other models' scores reused
    assert "same_schedule" in json.loads((demo / "summary.json").read_text())["single_models"]
    assert json.loads((demo / "run.json").read_text())["finished"]


# --------------------------------------------------------------------------- dedup


def test_dedup_score_by_hand():
    """a2 copies a1, b2 and b3 copy b1, c2 copies c1; d1, e1, e2 are plain. Removed: a2 (a
    copy: right), b1 (an original whose copies were kept: right), c2 (a copy: right), c1 (an
    original whose copy went too: one too many, other), e2 (in no injected pair: other)."""
    pool = {"a1": None, "a2": "a1", "b1": None, "b2": "b1", "b3": "b1", "c1": None, "c2": "c1",
            "d1": None, "e1": None, "e2": None}  # fmt: skip
    kept = {"a1", "b2", "b3", "d1", "e1"}
    got = report.dedup_score(pool, kept)
    assert got == {
        "pool": 10, "kept": 5, "removed": 5, "injected_pairs": 4, "injected_pairs_found": 4, "right": 3,
        "other_removed": 2, "precision": 3 / 5, "recall": 4 / 4,
    }  # fmt: skip
    # nothing removed: precision undefined, no pair found; nothing injected: recall undefined
    assert report.dedup_score(pool, set(pool)) == {**got, "kept": 10, "removed": 0, "injected_pairs_found": 0,
                                                      "right": 0, "other_removed": 0, "precision": None, "recall": 0.0}  # fmt: skip
    assert report.dedup_score({"x": None, "y": None}, {"x"})["recall"] is None
    # an original removed while its only copy also went: still one pair, found once
    assert report.dedup_score({"o": None, "c": "o", "z": None}, {"z"})["injected_pairs_found"] == 1


def test_dedup_runs_before_curate_and_is_scored_on_the_samples_record(demo):
    """summary.json's dedup figures against a count made here from the pool's .json members and
    dedup's kept_keys.txt; curate read that list (its run.json records the file's sha256) and
    curated only kept records; the summary line and paragraph state the figures."""
    import hashlib

    s = pipeline.QUICK
    kept_file = pipeline.dedup_kept_keys(demo, s)
    kept = set(kept_file.read_text().split())
    dup_of = {}
    for key, _, meta in report.captioned_records(sorted((demo / "sample" / "pool").glob("*.tar"))):
        dup_of[key] = meta["near_duplicate_of"]
    removed = set(dup_of) - kept
    copies = {k for k, v in dup_of.items() if v}
    assert copies and all(dup_of[c] in dup_of for c in copies)
    right = [k for k in removed if dup_of[k] or any(dup_of[c] == k and c in kept for c in copies)]
    found = [c for c in copies if c in removed or dup_of[c] in removed]
    d = json.loads((demo / "summary.json").read_text())["dedup"]
    assert (d["pool"], d["removed"], d["injected_pairs"]) == (s.num_pairs, len(removed), len(copies))
    assert d["precision"] == len(right) / len(removed) and d["recall"] == len(found) / len(copies)
    assert d["other_removed"] == len(removed) - len(right)
    # the hash embedder ignores case and punctuation: each injected copy is its original's twin
    assert d["recall"] == 1.0 and d["removed_semantic"] == d["removed"] > 0
    assert d["applied_to_curation"] and (d["eps"], d["clusters"]) == (s.dedup_eps, s.dedup_clusters)
    curate_args = json.loads((demo / "curated" / "run.json").read_text())["args"]
    assert curate_args["--keep-keys"] == hashlib.sha256(kept_file.read_bytes()).hexdigest()
    curated = {k for k, _, _ in report.captioned_records(sorted((demo / "curated" / "data").glob("*.tar")))}
    assert curated <= kept and not curated & removed
    assert json.loads((demo / "curated" / "summary.json").read_text())["filtered_by_keep_keys"] == len(removed)
    assert json.loads((demo / "summary.json").read_text())["curation"]["deduplicated_away"] == len(removed)
    text = (demo / "summary.md").read_text()
    assert "## Deduplication (SemDeDup, before curation)" in text
    assert f"It removed **{len(removed)} of {s.num_pairs}** pool pairs" in text
    assert f"**recall {100 * d['recall']:.1f}%**" in text and "The curation below reads its kept list" in text
    assert text.index("## Deduplication") < text.index("## Curation")


def test_a_demo_curated_before_the_dedup_step_runs_only_dedup(demo, tmp_path, capsys):
    """An older demo folder (finished, its curation without --keep-keys, no dedup/; its run.json
    without dedup settings, as this one at their defaults): the rerun runs dedup alone, nothing after it, and says the
    curated pool is not deduplicated; the next rerun is a no-op."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo, out)
    s = pipeline.QUICK
    pool, curated = str(out / "sample" / "pool"), str(out / "curated")
    assert cli.main(["curate", pool, "--out", curated, "--target-size", str(s.target_size), "--seed", "0"]) == 0
    state = json.loads((out / "run.json").read_text())
    del state["units"]["dedup"]
    assert not set(pipeline.ADDED_SETTINGS) & set(state["args"])
    (out / "run.json").write_text(json.dumps(state))
    shutil.rmtree(out / "dedup")
    before = {p: p.stat().st_mtime_ns for p in (out / "curated").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "was curated before this mode-fast added dedup: running it alone" in printed
    steps = json.loads((out / "timings.json").read_text())["runs"][-1]["steps"]
    assert [x["step"] for x in steps if not x.get("skipped")] == ["dedup"]
    assert {p: p.stat().st_mtime_ns for p in (out / "curated").rglob("*") if p.is_file()} == before
    d = json.loads((out / "summary.json").read_text())["dedup"]
    assert not d["applied_to_curation"] and d["removed"] > 0
    assert "the curated pool below is not deduplicated" in (out / "summary.md").read_text()
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0  # now finished: every step skipped
    steps = json.loads((out / "timings.json").read_text())["runs"][-1]["steps"]
    assert all(x.get("skipped") for x in steps)
