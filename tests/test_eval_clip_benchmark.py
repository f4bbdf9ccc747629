"""`mode-fast eval` on the field's benchmark layout: CLIP_benchmark's webdataset folders
(LAION-AI/CLIP_benchmark, clip_benchmark/datasets/builder.py build_wds_dataset) read as they
are, its metrics (acc1, acc5, mean per-class recall = scikit-learn's balanced accuracy;
retrieval recall@k with several captions per image) checked against scikit-learn and plain
numpy from the stored scores, its result JSON layout, and the class names and templates
the clip-benchmark package ships (--classes/--templates cb:NAME)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import N_EXPERTS, env, eval_cli, eval_items  # noqa: F401  (env: fixture)

from mode_fast.evaluation import scoring, tasks

CB_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def as_format(jpg: bytes, fmt: str) -> bytes:
    """The image re-encoded (CLIP_benchmark's converter writes webp by default)."""
    from PIL import Image

    if fmt == "jpg":
        return jpg
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buf, format={"webp": "WEBP", "png": "PNG"}[fmt], lossless=True)
    return buf.getvalue()


def write_cb_split(folder: Path, split: str, samples: list[dict[str, bytes]], n_shards: int = 2) -> None:
    """FOLDER/SPLIT/0.tar..(n-1).tar and nshards.txt, as clip_benchmark_export_wds writes them."""
    where = folder / split
    where.mkdir(parents=True)
    per = -(-len(samples) // n_shards)
    for s in range(n_shards):
        with tarfile.open(where / f"{s}.tar", "w") as tf:
            for i in range(s * per, min(len(samples), (s + 1) * per)):
                for ext, data in samples[i].items():
                    add_member(tf, f"s{i:07d}.{ext}", data)
    (where / "nshards.txt").write_text(f"{n_shards}\n")


def write_cb_classification(folder: Path, items: list[tuple[bytes, int]], classes: list[str], templates: list[str]):
    fmts = ("webp", "png", "jpg")
    samples = [{fmts[i % 3]: as_format(jpg, fmts[i % 3]), "cls": str(y).encode()} for i, (jpg, y) in enumerate(items)]
    write_cb_split(folder, "test", samples)
    write_cb_split(folder, "train", samples[:10], n_shards=1)
    (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
    # CLIP_benchmark marks the class with {c}
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates))


def stored(out: Path, task: str, model: str) -> dict[str, np.ndarray]:
    with np.load(out / "scores" / task / f"model-{model}.npz") as z:
        return {k: z[k] for k in z.files}


def test_cb_classification_folder_metrics_match_sklearn(env, tmp_path):  # noqa: F811
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    sample_eval = env["sample"] / "eval"
    classes = json.loads((sample_eval / "classes.json").read_text())
    templates = json.loads((sample_eval / "templates.json").read_text())
    items = eval_items(env["sample"])
    folder = tmp_path / "wds_shapes"
    write_cb_classification(folder, items, classes, templates)

    out = tmp_path / "out"
    assert eval_cli(env, out, "--data", f"sample={env['sample']}", str(folder), f"tr={folder}:train") == 0
    res = json.loads((out / "results.json").read_text())
    cb, ref, tr = res["tasks"]["wds_shapes"], res["tasks"]["sample"], res["tasks"]["tr"]
    assert cb["n_images"] == 48 and tr["n_images"] == 10 and cb["n_classes"] == 16
    assert cb["n_templates"] == len(templates)
    # the same images, class names and templates as the sample's own eval split, read the CB way
    for metric in ("top1", "top5", "mean_per_class_recall"):
        for method, value in ref[metric].items():
            assert cb[metric][method] == pytest.approx(value, abs=1e-6), (metric, method)

    labels = np.array([y for _, y in items])
    models = [f"expert_{k}" for k in range(N_EXPERTS)] + ["seed"]
    cosines = {}
    for m in models:
        z = stored(out, "wds_shapes", m)
        np.testing.assert_array_equal(z["targets"], labels)
        cosines[m] = z["scores"].astype(np.float64)
    cosines["mean_ensemble"] = sum(cosines[f"expert_{k}"] for k in range(N_EXPERTS)) / N_EXPERTS
    every = list(range(16))
    for m, s in cosines.items():
        assert cb["top1"][m] == pytest.approx(top_k_accuracy_score(labels, s, k=1, labels=every)), m
        assert cb["top5"][m] == pytest.approx(top_k_accuracy_score(labels, s, k=5, labels=every)), m
        assert cb["mean_per_class_recall"][m] == pytest.approx(balanced_accuracy_score(labels, s.argmax(1))), m
    avg = res["average"]["mean_per_class_recall"]
    assert avg["seed"] == pytest.approx(np.mean([t["mean_per_class_recall"]["seed"] for t in res["tasks"].values()]))
    md = (out / "results.md").read_text()
    assert "mean per-class recall" in md
    row = f"{100 * cb['top5']['seed']:.1f} / {100 * cb['mean_per_class_recall']['seed']:.1f}"
    assert any(line.startswith("| wds_shapes |") and row in line for line in md.splitlines())

    # CLIP_benchmark's result layout, one file per task and method
    records = {p.name: json.loads(p.read_text()) for p in (out / "clip_benchmark").glob("*.json")}
    assert len(records) == 3 * (N_EXPERTS + 3 + 1)
    rec = records["wds_shapes__seed.json"]
    assert set(rec) == CB_KEYS and rec["task"] == "zeroshot_classification" and rec["language"] == "en"
    assert rec["dataset"] == "wds_shapes" and rec["model"] == "seed"
    assert rec["pretrained"] == str(env["run"] / "seed" / "checkpoints" / "final.pt")
    assert rec["metrics"] == {
        "acc1": cb["top1"]["seed"],
        "acc5": cb["top5"]["seed"],
        "mean_per_class_recall": cb["mean_per_class_recall"]["seed"],
    }
    assert records["tr__mode_ensemble.json"]["metrics"]["acc1"] == tr["top1"]["mode_ensemble"]
    # clip_benchmark's own aggregation (`clip_benchmark build`) reads them
    from argparse import Namespace

    import pandas as pd
    from clip_benchmark.cli import main_build

    csv = tmp_path / "benchmark.csv"
    main_build(Namespace(files=[str(out / "clip_benchmark")], output=str(csv)))
    table = pd.read_csv(csv)
    assert len(table) == len(records)
    got = table.set_index(["dataset", "model"]).loc[("wds_shapes", "expert_1")]
    assert got["mean_per_class_recall"] == pytest.approx(cb["mean_per_class_recall"]["expert_1"])

    # the records are among run.json's outputs; a rerun is a no-op that keeps them
    assert "clip_benchmark/wds_shapes__seed.json" in (out / "run.json").read_text()
    assert eval_cli(env, out, "--data", f"sample={env['sample']}", str(folder), f"tr={folder}:train") == 0
    assert {p.name for p in (out / "clip_benchmark").glob("*.json")} == set(records)


def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 7, size=40)
        labels[labels == 4] = 5  # a class absent from the labels but predicted: left out, as sklearn does
        logits = rng.standard_normal((40, 7))
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns about the predicted, absent class
                want = balanced_accuracy_score(labels, logits.argmax(1))
        assert scoring.mean_per_class_recall(logits, labels) == pytest.approx(want)


def test_cb_split_and_layout_errors(tmp_path):
    folder = tmp_path / "wds_x"
    write_cb_split(folder, "test", [{"jpg": b"x", "cls": b"0"}], n_shards=1)
    assert tasks.cb_folder(str(folder)) == (folder, "test")
    assert tasks.cb_folder(f"{folder}:train") == (folder, "train")
    with pytest.raises(tasks.EvalError, match=r"without a train/ split \(it has: test\); pick one with FOLDER:SPLIT"):
        tasks.load_task(f"{folder}:train")
    with pytest.raises(tasks.EvalError, match=r"no classnames.txt: pass --classes"):
        tasks.load_task(str(folder))
    (folder / "dataset_type.txt").write_text("retrieval\n")
    with pytest.raises(tasks.EvalError, match=r"retrieval dataset \(dataset_type.txt\): pass it as --retrieval"):
        tasks.load_task(str(folder))
    (folder / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(tasks.EvalError, match=r"says 3 shards but .* lacks 1.tar, 2.tar"):
        tasks.load_retrieval_task(str(folder))


def package_json(name: str) -> dict:
    """The clip-benchmark package's own JSON, read here directly."""
    return json.loads((files("clip_benchmark") / "datasets" / name).read_text(encoding="utf-8"))


def test_cb_class_names_and_templates_are_the_packages():
    shipped_t = package_json("en_zeroshot_classification_templates.json")
    shipped_c = package_json("en_classnames.json")
    got, source = tasks.option_templates("cb:cifar10")
    assert source == "--templates cb:cifar10"
    assert got == [t.format(c="{}") for t in shipped_t["cifar10"]] and len(got) == 18
    assert tasks.option_templates("cb:wds/cifar10")[0] == got  # CLIP_benchmark's wds/ names
    for name in ("mnist", "pets", "eurosat"):
        assert tasks.option_classes(f"cb:{name}")[0] == shipped_c[name]
    # imagenet1k is open_clip's list: the same renames as --classes imagenet
    assert tasks.option_classes("cb:imagenet1k")[0] == tasks.named_classes("imagenet")
    # cifar10's names come from torchvision in CLIP_benchmark: not shipped, said in one line
    with pytest.raises(tasks.EvalError) as e:
        tasks.option_classes("cb:cifar10")
    assert "no class names for 'cifar10'" in str(e.value) and "classnames.txt" in str(e.value)
    assert "\n" not in str(e.value) and "mnist" in str(e.value)
    with pytest.raises(tasks.EvalError, match=r"no templates for 'imagenet' \(close names: cb:imagenet1k"):
        tasks.option_templates("cb:imagenet")


def test_cb_names_do_not_import_clip_benchmark():
    code = (
        "import sys; from mode_fast.evaluation import tasks; tasks.option_classes('cb:mnist'); "
        "tasks.option_templates('cb:cifar10'); print(sorted(m for m in sys.modules if 'clip_benchmark' in m))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert got.strip() == "[]"


def recall_reference(sim: np.ndarray, right: list[set[int]], k: int) -> float:
    """Per query, a hit when one of its right items is among its k best (plain numpy argsort)."""
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float(np.mean([bool(set(row.tolist()) & r) for row, r in zip(top, right)]))


def test_cb_retrieval_folder_with_two_captions_per_image(env, tmp_path):  # noqa: F811
    classes = json.loads((env["sample"] / "eval" / "classes.json").read_text())
    items = eval_items(env["sample"])[:24]
    samples = [
        {"webp": as_format(jpg, "webp"), "txt": f"photo {i} of a {classes[y]}\n{classes[y]} number {i}".encode()}
        for i, (jpg, y) in enumerate(items)
    ]
    folder = tmp_path / "wds_caps"
    write_cb_split(folder, "test", samples)
    (folder / "dataset_type.txt").write_text("retrieval\n")

    out = tmp_path / "out"
    assert eval_cli(env, out, "--retrieval", f"caps={folder}") == 0
    res = json.loads((out / "results.json").read_text())
    task = res["retrieval"]["caps"]
    assert task["n_pairs"] == 24 and task["n_captions"] == 48 and sum(task["captions_per_expert"]) == 48
    z = stored(out, "caps", "expert_0")
    assert z["scores"].shape == (24, 48)
    assert z["targets"][1] == f"{classes[items[0][1]]} number 0"  # captions in image order
    image_of = np.repeat(np.arange(24), 2)  # as written: captions 2i and 2i+1 are image i's
    for m in [f"expert_{k}" for k in range(N_EXPERTS)] + ["seed"]:
        s = stored(out, "caps", m)["scores"].astype(np.float64)
        r = task["recall"][m]
        for k in (1, 5, 10):
            i2t = recall_reference(s, [{2 * i, 2 * i + 1} for i in range(24)], k)
            t2i = recall_reference(s.T, [{int(i)} for i in image_of], k)
            assert r[f"image_to_text_R@{k}"] == pytest.approx(i2t), (m, k)
            assert r[f"text_to_image_R@{k}"] == pytest.approx(t2i), (m, k)
    rec = json.loads((out / "clip_benchmark" / "caps__seed.json").read_text())
    assert set(rec) == CB_KEYS and rec["task"] == "zeroshot_retrieval"
    seed = task["recall"]["seed"]
    assert rec["metrics"]["text_retrieval_recall@5"] == seed["image_to_text_R@5"]
    assert rec["metrics"]["image_retrieval_recall@1"] == seed["text_to_image_R@1"]
    with pytest.raises(tasks.EvalError, match=r"a CLIP_benchmark retrieval dataset"):
        tasks.load_task(str(folder))


def test_recall_with_positives_is_recall_at_k_for_one_caption_each():
    rng = np.random.default_rng(1)
    sim = rng.standard_normal((9, 9))
    assert scoring.recall_at_k_positives(sim, np.eye(9, dtype=bool)) == scoring.recall_at_k(sim)


def test_cb_records_leave_acc5_out_under_five_classes():
    """CLIP_benchmark gives acc5 as NaN under 5 classes; the records say null (valid JSON)."""
    from mode_fast.evaluation.results import clip_benchmark_records

    methods = ["expert_0", "best_expert", "mean_ensemble", "mode_ensemble", "seed"]
    task = {
        "n_classes": 3,
        "best_expert": "expert_0",
        **{m: dict.fromkeys(methods, 0.5) for m in ("top1", "top5", "mean_per_class_recall")},
    }
    results = {
        "n_experts": 1,
        "run": "RUN",
        "single_models": ["seed"],
        "experts": {"expert_0": "RUN/expert_0/checkpoints/final.pt"},
        "single_model_checkpoints": {"seed": "S.pt"},
        "tasks": {"a.b/c": task},
        "retrieval": {},
    }
    records = clip_benchmark_records(results)
    assert sorted(records) == sorted(f"a%2Eb%2Fc__{m}.json" for m in methods)
    assert records["a%2Eb%2Fc__seed.json"]["metrics"] == {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5}
    assert records["a%2Eb%2Fc__best_expert.json"]["pretrained"] == "RUN/expert_0/checkpoints/final.pt"
    assert records["a%2Eb%2Fc__mode_ensemble.json"]["pretrained"] == "RUN"


def test_eval_on_a_cb_folder_with_the_packages_class_names_and_templates(env, tmp_path):  # noqa: F811
    """A CLIP_benchmark folder without its own lists, named by the package's: mnist's 10 class
    names, cifar10's templates (images relabelled into 10 classes: the names are what is tested)."""
    items = [(jpg, y % 10) for jpg, y in eval_items(env["sample"])]
    folder = tmp_path / "wds_mnist"
    write_cb_split(folder, "test", [{"jpg": jpg, "cls": str(y).encode()} for jpg, y in items])
    out = tmp_path / "out"
    assert eval_cli(env, out, "--data", f"mnist={folder}", "--classes", "cb:mnist", "--templates", "cb:cifar10") == 0
    res = json.loads((out / "results.json").read_text())["tasks"]["mnist"]
    shipped_classes = package_json("en_classnames.json")["mnist"]
    shipped_templates = [
        t.replace("{c}", "{}") for t in package_json("en_zeroshot_classification_templates.json")["cifar10"]
    ]
    assert res["n_classes"] == 10 == len(shipped_classes) and res["n_templates"] == len(shipped_templates)
    # the same lists given as plain files give the same numbers: eval used the package's lists
    (tmp_path / "classes.json").write_text(json.dumps(shipped_classes))
    (tmp_path / "templates.json").write_text(json.dumps(shipped_templates))
    plain = tmp_path / "plain"
    files_args = ["--classes", str(tmp_path / "classes.json"), "--templates", str(tmp_path / "templates.json")]
    assert eval_cli(env, plain, "--data", f"mnist={folder}", *files_args) == 0
    ref = json.loads((plain / "results.json").read_text())["tasks"]["mnist"]
    for key in ("expert_weights", "top1", "top5", "mean_per_class_recall", "correct"):
        assert res[key] == ref[key], key
    rec = json.loads((out / "clip_benchmark" / "mnist__seed.json").read_text())
    assert rec["metrics"]["acc1"] == pytest.approx(res["top1"]["seed"])
