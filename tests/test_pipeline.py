"""The end-to-end demo (`python -m mode_fast.pipeline --quick`) on a tiny sample: every step
runs through the CLI, the single model gets the ensemble's training compute, a rerun resumes."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from mode_fast import pipeline

torch.set_num_threads(1)  # shared 2-core machine


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert pipeline.main(["--out", str(out), "--quick"]) == 0
    return out


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_demo_runs_every_step_and_reports(demo):
    s = pipeline.QUICK
    timings = json.loads((demo / "timings.json").read_text())
    names = [x["step"] for x in timings["steps"]]
    assert names[:4] == ["sample", "curate", "cluster", "train seed"]
    assert [n for n in names if n.startswith("train expert")] == [f"train expert {k}" for k in range(s.experts)]
    assert names[-2:] == ["eval", "eval digits"]  # scikit-learn is in the dev environment
    results = json.loads((demo / "eval" / "results.json").read_text())
    assert list(results["tasks"]) == ["all16", "shapes", "textures", "glyphs", "scenes"]
    assert results["single_models"] == ["seed", "same_compute"]
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


def test_verdict_is_judged_at_the_printed_precision():
    # 10.13% vs 10.07% both print as 10.1%: a tie, not "10.1% beats 10.1%"
    assert pipeline._verdict(0.1013, 0.1007) == "ties with"
    assert pipeline._verdict(0.440, 0.434) == "beats"
    assert pipeline._verdict(0.434, 0.440) == "loses to"


def test_demo_scores_sklearn_digits_apart_from_the_headline(demo):
    s = pipeline.QUICK
    digits = json.loads((demo / "eval_digits" / "results.json").read_text())
    assert list(digits["tasks"]) == ["digits"] and digits["single_models"] == ["seed", "same_compute"]
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
    assert pipeline.main(["--out", str(out), "--quick"]) == 0
    timings = json.loads((out / "timings.json").read_text())
    assert [x["step"] for x in timings["steps"]][-1] == "eval"
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


def test_rerun_skips_finished_training(demo):
    before = ckpt(demo / "run" / "expert_0" / "checkpoints" / "final.pt")["state_dict"]
    assert pipeline.main(["--out", str(demo), "--quick"]) == 0
    names = [x["step"] for x in json.loads((demo / "timings.json").read_text())["steps"]]
    assert not [n for n in names if n.startswith("train") or n == "cluster"]
    after = ckpt(demo / "run" / "expert_0" / "checkpoints" / "final.pt")["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
