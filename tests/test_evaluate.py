"""`mode-fast eval` on tiny random-init models: the ensemble arithmetic against an independent
recomputation, every input format, retrieval, outputs, and the bad-input errors."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_fast import cli
from mode_fast.clustering.embedders import HashEmbedder
from mode_fast.clustering.experts import TwoLevel
from mode_fast.demo.sample import write_sample
from mode_fast.evaluation import scoring, tasks
from mode_fast.evaluation.ensemble import expert_weights
from mode_fast.evaluation.results import method_order
from mode_fast.training.checkpoint import CHECKPOINT_FORMAT
from mode_fast.training.models import register_model_configs

torch.set_num_threads(1)  # shared 2-core machine

N_EXPERTS = 3
MODEL = "mode-fast-tiny"


def save_random_model(path: Path, seed: int) -> Path:
    """A train-format checkpoint of a randomly initialised model (what load_model reads)."""
    import open_clip

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": CHECKPOINT_FORMAT, "model_name": MODEL, "model_kwargs": {}, "state_dict": model.state_dict()}, path
    )
    return path


def make_centers(path: Path, n_experts: int = N_EXPERTS, fine_k: int = 12, dim: int = 64) -> TwoLevel:
    rng = np.random.default_rng(0)
    fine = rng.standard_normal((fine_k, dim)).astype(np.float32)
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    coarse_of = np.arange(fine_k) % n_experts
    model = TwoLevel(
        fine, fine[:n_experts].copy(), coarse_of.astype(np.int64), {"embedder": f"hash{dim}", "n_experts": n_experts}
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "centers.npz")
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    write_sample(root / "sample", num_pairs=40, shard_size=20, eval_pairs=48, image_size=32)
    run = root / "run"
    save_random_model(run / "seed" / "checkpoints" / "final.pt", 100)
    for k in range(N_EXPERTS):
        save_random_model(run / f"expert_{k}" / "checkpoints" / "final.pt", k)
    make_centers(root / "clusters")
    return {"root": root, "sample": root / "sample", "run": run, "clusters": root / "clusters"}


def eval_cli(
    env: dict[str, Path], out: Path, *extra: str, run: Path | None = None, clusters: Path | None = None
) -> int:
    return cli.main(
        [
            "eval",
            "--run",
            str(run or env["run"]),
            "--clusters",
            str(clusters or env["clusters"]),
            "--out",
            str(out),
            "--batch-size",
            "16",
            *extra,
        ]
    )


def eval_items(sample: Path) -> list[tuple[bytes, int]]:
    """(jpg bytes, label) of the sample's eval split, read with tarfile directly."""
    out = []
    for shard in sorted((sample / "eval").glob("*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            out.append((members[name], int(members[name[:-4] + ".cls"])))
    return out


def reference_logits(ckpt: Path, images: list[bytes], classes: list[str], templates: list[str]) -> np.ndarray:
    """Zero-shot logits computed here from open_clip directly (independent of mode_fast.evaluation)."""
    import open_clip
    from PIL import Image

    register_model_configs()
    state = torch.load(ckpt, weights_only=True)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.load_state_dict(state["state_dict"])
    model.eval()
    tok = open_clip.get_tokenizer(MODEL)
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = model.encode_image(x)
        img = img / img.norm(dim=-1, keepdim=True)
        rows = []
        for c in classes:
            t = model.encode_text(tok([tp.format(c) for tp in templates]))
            t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(t / t.norm())
        return (model.logit_scale.exp() * img @ torch.stack(rows).T).double().numpy()


def template_mean(classes: list[str], templates: list[str]) -> np.ndarray:
    """MoDE's class embeddings (mode.md), computed here: per class the hash embeddings of its
    prompts, averaged, then normalised."""
    rows = []
    for c in classes:
        e = np.asarray(HashEmbedder(64)([t.format(c) for t in templates]), dtype=np.float64).mean(0)
        rows.append(e / np.linalg.norm(e))
    return np.stack(rows)


def test_sample_eval_matches_an_independent_recomputation(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert eval_cli(env, out, "--data", f"sample={env['sample']}") == 0
    res = json.loads((out / "results.json").read_text())
    task = res["tasks"]["sample"]
    classes = json.loads((env["sample"] / "eval" / "classes.json").read_text())
    templates = json.loads((env["sample"] / "eval" / "templates.json").read_text())
    items = eval_items(env["sample"])
    labels = np.array([y for _, y in items])
    assert task["n_images"] == len(items) == 48 and task["n_classes"] == len(classes)

    logits = [
        reference_logits(
            env["run"] / f"expert_{k}" / "checkpoints" / "final.pt", [b for b, _ in items], classes, templates
        )
        for k in range(N_EXPERTS)
    ]
    seed_logits = reference_logits(
        env["run"] / "seed" / "checkpoints" / "final.pt", [b for b, _ in items], classes, templates
    )
    w = expert_weights(
        template_mean(classes, templates),
        TwoLevel.load(env["clusters"] / "centers.npz").fine_centroids,
        np.arange(12) % N_EXPERTS,
        N_EXPERTS,
    )
    np.testing.assert_allclose(task["expert_weights"], w, rtol=1e-6)
    assert res["ensemble_inputs"] == "cosine" and "plain cosine similarities" in (out / "results.md").read_text()
    acc = lambda lg: float((lg.argmax(1) == labels).mean())  # noqa: E731
    for k in range(N_EXPERTS):
        assert task["top1"][f"expert_{k}"] == pytest.approx(acc(logits[k]))
    assert task["top1"]["seed"] == pytest.approx(acc(seed_logits))
    assert task["top1"]["best_expert"] == max(acc(lg) for lg in logits)
    assert task["top1"]["mean_ensemble"] == pytest.approx(acc(sum(logits) / N_EXPERTS))
    assert task["top1"]["mode_ensemble"] == pytest.approx(acc(sum(wk * lg for wk, lg in zip(w, logits))))
    top5 = float((np.argsort(-logits[0], 1)[:, :5] == labels[:, None]).any(1).mean())
    assert task["top5"]["expert_0"] == pytest.approx(top5)
    assert res["average"]["top1"] == task["top1"]  # one task: its own average

    md = (out / "results.md").read_text()
    assert "| sample |" in md and "mode_ensemble" in md and "| **average** |" in md
    from PIL import Image

    for png in ("accuracy.png", "expert_weights.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    assert not list(out.glob(".*tmp")), "temporaries left behind"
    assert "mode_ensemble" in capsys.readouterr().out


def test_ensembles_combine_cosines_when_the_scales_differ(env, tmp_path):
    """mode.md: MoDE weights the experts' plain cosine similarities. With expert logit scales
    100, 1 and 10 the cosine and the scaled combinations rank differently; eval does the
    first by default and the second with --ensemble-inputs scaled."""
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    scales = [100.0, 1.0, 10.0]
    for k, scale in enumerate(scales):
        ckpt = run / f"expert_{k}" / "checkpoints" / "final.pt"
        state = torch.load(ckpt, weights_only=True)
        state["state_dict"]["logit_scale"] = torch.tensor(math.log(scale))
        torch.save(state, ckpt)
    classes = json.loads((env["sample"] / "eval" / "classes.json").read_text())
    templates = json.loads((env["sample"] / "eval" / "templates.json").read_text())
    items = eval_items(env["sample"])
    labels = np.array([y for _, y in items])
    cos = [
        reference_logits(run / f"expert_{k}" / "checkpoints" / "final.pt", [b for b, _ in items], classes, templates)
        / scales[k]
        for k in range(N_EXPERTS)
    ]
    w = expert_weights(
        template_mean(classes, templates),
        TwoLevel.load(env["clusters"] / "centers.npz").fine_centroids,
        np.arange(12) % N_EXPERTS,
        N_EXPERTS,
    )
    want = {
        "cosine": sum(wk * c for wk, c in zip(w, cos)),
        "scaled": sum(wk * s * c for wk, s, c in zip(w, scales, cos)),
    }
    assert (want["cosine"].argmax(1) != want["scaled"].argmax(1)).any(), "the example must tell them apart"
    for inputs, logits in want.items():
        out = tmp_path / inputs
        assert eval_cli(env, out, "--data", f"sample={env['sample']}", "--ensemble-inputs", inputs, run=run) == 0
        task = json.loads((out / "results.json").read_text())["tasks"]["sample"]
        np.testing.assert_array_equal(task["correct"]["mode_ensemble"], (logits.argmax(1) == labels).astype(int))
        assert task["top1"]["mode_ensemble"] == pytest.approx(float((logits.argmax(1) == labels).mean()))


def write_formats(sample: Path, root: Path) -> dict[str, Path]:
    """The eval split again as a folder per class, a CSV, and shards with a json class-name label."""
    classes = json.loads((sample / "eval" / "classes.json").read_text())
    items = eval_items(sample)
    folder, csv_dir, wds_dir = root / "folder", root / "csv", root / "wds"
    csv_dir.mkdir(parents=True)
    wds_dir.mkdir(parents=True)
    rows = []
    with tarfile.open(wds_dir / "x-000.tar", "w") as tf:
        for i, (jpg, y) in enumerate(items):
            d = folder / classes[y].replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.jpg").write_bytes(jpg)
            (csv_dir / "img").mkdir(exist_ok=True)
            (csv_dir / "img" / f"{i:04d}.jpg").write_bytes(jpg)
            rows.append((f"img/{i:04d}.jpg", classes[y]))
            for ext, data in (("jpg", jpg), ("json", json.dumps({"label": classes[y]}).encode())):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with open(csv_dir / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    # the folder's classes are its sub-folder names, so give the others the same sorted list
    names = sorted(c for c in classes if (folder / c.replace(" ", "_")).is_dir())
    for d in (csv_dir, wds_dir):
        (d / "classes.json").write_text(json.dumps(names))
    return {"folder": folder, "csv": csv_dir / "labels.csv", "wds": wds_dir}


def test_every_input_format_gives_the_same_scores(env, tmp_path):
    paths = write_formats(env["sample"], tmp_path)
    templates = env["sample"] / "eval" / "templates.json"
    out = tmp_path / "out"
    assert eval_cli(env, out, "--templates", str(templates), "--data", *(f"{k}={v}" for k, v in paths.items())) == 0
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert set(tasks) == {"folder", "csv", "wds"}
    for name in ("csv", "wds"):
        assert tasks[name]["n_images"] == tasks["folder"]["n_images"] == 48
        for method, value in tasks["folder"]["top1"].items():
            assert tasks[name]["top1"][method] == pytest.approx(value), (name, method)
    for method in tasks["folder"]["top1"]:
        assert res["average"]["top1"][method] == pytest.approx(np.mean([t["top1"][method] for t in tasks.values()]))


def test_retrieval_recall_both_ways(env, tmp_path):
    out = tmp_path / "out"
    assert eval_cli(env, out, "--retrieval", f"pool={env['sample'] / 'pool'}") == 0
    res = json.loads((out / "results.json").read_text())
    task = res["retrieval"]["pool"]
    assert task["n_pairs"] == 40
    assert sum(task["captions_per_expert"]) == 40
    for method, r in task["recall"].items():
        for d in ("image_to_text", "text_to_image"):
            assert 0 <= r[f"{d}_R@1"] <= r[f"{d}_R@5"] <= r[f"{d}_R@10"] <= 1, method
    assert (out / "retrieval.png").is_file()


def test_recall_at_k_ranks():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.2, 0.3, 0.1]])
    # ranks of the right item: query 0 -> 0, query 1 -> 1, query 2 -> 2
    assert scoring.recall_at_k(sim, (1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}
    assert scoring.recall_at_k(np.eye(4), (1,)) == {"R@1": 1.0}


def test_topk_accuracy():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    assert scoring.topk_accuracy(logits, np.array([1, 2]), 1) == 0.5
    assert scoring.topk_accuracy(logits, np.array([1, 2]), 2) == 0.5
    assert scoring.topk_accuracy(logits, np.array([1, 2]), 3) == 1.0


# --------------------------------------------------------------------------- bad input
def test_missing_expert_checkpoint_is_named(env, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    (run / "expert_1" / "checkpoints" / "final.pt").unlink()
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), run=run) == 2
    err = capsys.readouterr().err
    assert "expert_1/checkpoints/final.pt" in err and "missing" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_baseline_checkpoint_is_named(env, tmp_path, capsys):
    assert (
        eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), "--baseline", f"big={tmp_path / 'nope.pt'}") == 2
    )
    assert "nope.pt not found" in capsys.readouterr().err


def test_expert_count_must_match_the_cluster_file(env, tmp_path, capsys):
    more = tmp_path / "clusters4"
    make_centers(more, n_experts=4)
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), clusters=more) == 2
    err = capsys.readouterr().err
    assert "4 experts" in err and "expert_3" in err
    fewer = tmp_path / "clusters2"
    make_centers(fewer, n_experts=2)
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), clusters=fewer) == 2
    err = capsys.readouterr().err
    assert "2 experts" in err and "expert_2" in err


@pytest.mark.parametrize(
    "classes, message",
    [
        (["circle", "square", "circle"], "'circle' appears twice"),
        (["circle", "  ", "square"], "index 1 is empty"),
        ([], "class list is empty"),
    ],
)
def test_bad_class_lists_are_named(env, tmp_path, capsys, classes, message):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(classes))
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), "--classes", str(path)) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_label_outside_the_class_list_is_named(env, tmp_path, capsys):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(["only", "two"]))
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), "--classes", str(path)) == 2
    assert "outside the 2 classes" in capsys.readouterr().err


def test_bad_templates_and_missing_data(env, tmp_path, capsys):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(["a photo of a {}.", "no placeholder"]))
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), "--templates", str(path)) == 2
    assert "template 1" in capsys.readouterr().err
    assert eval_cli(env, tmp_path / "out", "--data", str(tmp_path / "absent.tar")) == 2
    assert "absent.tar" in capsys.readouterr().err
    assert eval_cli(env, tmp_path / "out", "--data", str(env["sample"]), clusters=tmp_path / "noclusters") == 2
    assert "noclusters not found" in capsys.readouterr().err


def test_ensemble_weights_follow_the_class_names(env):
    """Classes placed exactly on one expert's fine centers give that expert the top weight."""
    centers = TwoLevel.load(env["clusters"] / "centers.npz")
    table = {f"c{i}": centers.fine_centroids[i] for i in range(12)}
    ens = scoring.Ensembler(centers, lambda texts: np.stack([table[t] for t in texts]))
    for k in range(N_EXPERTS):
        names = [f"c{i}" for i in range(12) if i % N_EXPERTS == k]
        w, groups = ens.weights(names)
        assert int(np.argmax(w)) == k and groups[k] == len(names)
        assert math.isclose(float(w.sum()), 1.0)


# --------------------------------------------------------------------------- sklearn digits
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.images), np.asarray(d.target)


def test_digits_task_is_sklearns_handwritten_digits():
    images, target = sklearn_digits()
    task = tasks.load_task("sklearn:digits")
    assert (task.name, task.source, task.kind) == ("digits", "sklearn:digits", "classification")
    items = list(task.items())
    labels = np.array([y for _, y in items])
    assert len(items) == 1797 and np.array_equal(labels, target)
    assert sorted(set(labels.tolist())) == list(range(10))
    # the sample's glyph domain calls its digits "digit one" / "digit seven": same words here
    from mode_fast.demo.sample import DOMAINS

    assert task.classes == [
        "digit zero",
        "digit one",
        "digit two",
        "digit three",
        "digit four",
        "digit five",
        "digit six",
        "digit seven",
        "digit eight",
        "digit nine",
    ]
    assert task.classes[1] in DOMAINS["glyphs"] and task.classes[7] in DOMAINS["glyphs"]
    assert task.templates and all(t.count("{}") == 1 for t in task.templates)
    for i in (0, 5, 1796):  # dark ink on white paper, each 8x8 pixel a 4x4 block
        im = items[i][0]()
        assert (im.mode, im.size) == ("RGB", (32, 32))
        px = np.asarray(im)
        assert np.array_equal(px[..., 0], px[..., 2])  # gray
        expected = np.rint(255 - images[i] * 255 / 16).astype(np.uint8)
        assert np.array_equal(px[..., 0], np.kron(expected, np.ones((4, 4), dtype=np.uint8)))
    first = np.stack([np.asarray(load()) for load, _ in items[:20]])
    assert first.min() == 0 and first.max() == 255  # full ink (16) is black, no ink (0) white


def test_digits_subset_is_balanced_and_deterministic():
    _, target = sklearn_digits()
    task = tasks.load_task("small=sklearn:digits:50")
    assert task.name == "small" and task.source == "sklearn:digits:50"
    first = [(np.asarray(load()), y) for load, y in task.items()]
    again = [(np.asarray(load()), y) for load, y in tasks.load_task("sklearn:digits:50").items()]
    assert len(first) == 50 and np.bincount([y for _, y in first]).tolist() == [5] * 10
    assert all(np.array_equal(a, b) and ya == yb for (a, ya), (b, yb) in zip(first, again))
    idx = tasks.balanced_subset(target, 50)
    assert np.all(np.diff(idx) > 0) and [y for _, y in first] == target[idx].tolist()


def test_digits_templates_and_classes_can_be_overridden(tmp_path):
    tpath = tmp_path / "t.json"
    tpath.write_text(json.dumps(["{}"]))
    cpath = tmp_path / "c.json"
    cpath.write_text(json.dumps([str(i) for i in range(10)]))
    task = tasks.load_task("sklearn:digits:10", cpath, tpath)
    assert task.templates == ["{}"] and task.classes == [str(i) for i in range(10)]
    assert len(tasks.load_task("sklearn:digits:10", templates_file="openai-imagenet").templates) == 80
    cpath.write_text(json.dumps(["zero", "one"]))
    with pytest.raises(tasks.EvalError, match="2 class names but digits has 10 classes"):
        tasks.load_task("sklearn:digits", cpath)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sklearn:xyz", "unknown scikit-learn dataset 'xyz' (known: sklearn:digits)"),
        ("d=sklearn:", "unknown scikit-learn dataset ''"),
        ("sklearn:digits:0", "must be a positive integer"),
        ("sklearn:digits:ten", "must be a positive integer"),
        ("sklearn:digits:5000", "asks for 5000 images but digits has 1797"),
    ],
)
def test_bad_sklearn_specs_are_named(env, tmp_path, capsys, spec, message):
    assert eval_cli(env, tmp_path / "out", "--data", spec) == 2
    err = capsys.readouterr().err
    assert message in err and spec.split("=")[-1] in err
    assert not (tmp_path / "out").exists()


def test_digits_without_sklearn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import -> ImportError
    with pytest.raises(tasks.EvalError, match=r"sklearn:digits needs scikit-learn, which is not installed"):
        tasks.load_task("sklearn:digits")


def test_evaluate_does_not_import_sklearn():
    code = "import sys, mode_fast.jobs.eval; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_digits_eval_end_to_end_matches_an_independent_recomputation(env, tmp_path):
    out = tmp_path / "out"
    assert eval_cli(env, out, "--data", "digits=sklearn:digits:60", f"sample={env['sample']}") == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["tasks"]) == ["digits", "sample"]
    task = res["tasks"]["digits"]
    assert (task["n_images"], task["n_classes"], task["n_templates"]) == (60, 10, len(tasks.DIGIT_TEMPLATES))
    assert task["source"] == "sklearn:digits:60"
    methods = method_order(res, N_EXPERTS)
    assert set(task["top1"]) == set(task["top5"]) == set(methods)
    # expert_0 and the seed, recomputed from open_clip on the same images (PNG is lossless)
    images, target = sklearn_digits()
    idx = tasks.balanced_subset(target, 60)
    pngs = []
    for px in images[idx]:
        buf = io.BytesIO()
        tasks.digit_image(px).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for name, ckpt in (
        ("expert_0", env["run"] / "expert_0" / "checkpoints" / "final.pt"),
        ("seed", env["run"] / "seed" / "checkpoints" / "final.pt"),
    ):
        lg = reference_logits(ckpt, pngs, tasks.DIGIT_CLASSES, tasks.DIGIT_TEMPLATES)
        assert task["top1"][name] == pytest.approx(float((lg.argmax(1) == target[idx]).mean()))
    w = expert_weights(
        template_mean(tasks.DIGIT_CLASSES, tasks.DIGIT_TEMPLATES),
        TwoLevel.load(env["clusters"] / "centers.npz").fine_centroids,
        np.arange(12) % N_EXPERTS,
        N_EXPERTS,
    )
    np.testing.assert_allclose(task["expert_weights"], w, rtol=1e-6)
    assert "| digits |" in (out / "results.md").read_text()


# --------------------------------------------------------------------------- ImageNet names
def test_imagenet_class_and_template_shortcuts(tmp_path, monkeypatch):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    names, source = tasks.option_classes("imagenet")
    assert len(names) == 1000 == len(set(names)) and source == "--classes imagenet"
    differ = [i for i, (a, b) in enumerate(zip(names, IMAGENET_CLASSNAMES)) if a != b]
    assert differ == [744, 836]  # open_clip's two repeated names, given their WordNet lemma
    assert (names[657], names[744], names[836], names[837]) == ("missile", "projectile", "sunglass", "sunglasses")
    assert names[0] == "tench" and names[999] == "toilet paper"
    assert tasks.option_templates("openai-imagenet")[0] == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert tasks.option_templates("simple-imagenet")[0] == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert len(tasks.option_templates("openai-imagenet")[0]) == 80
    # a CSV of ImageNet labels (indices or names) needs no JSON files
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")  # items() decode (a bad image is skipped)
    (tmp_path / "val.csv").write_text("path,label\na.png,1\na.png,goldfish\na.png,projectile\n")
    task = tasks.load_task(str(tmp_path / "val.csv"), "imagenet", "openai-imagenet")
    assert len(task.classes) == 1000 and len(task.templates) == 80
    assert [y for _, y in task.items()] == [1, 1, 744]
    # a file that happens to be called like a shortcut is still reachable as ./NAME
    monkeypatch.chdir(tmp_path)
    Path("imagenet").write_text(json.dumps(["a", "b"]))
    assert tasks.option_classes("./imagenet")[0] == ["a", "b"]
    assert len(tasks.option_classes("imagenet")[0]) == 1000


def test_imagenet_shortcuts_end_to_end(env, tmp_path, capsys):
    """An ImageNet-style CSV (path, class index) scored with no JSON files written."""
    root = tmp_path / "val"
    root.mkdir()
    rows = ["path,label"]
    for i, (jpg, _) in enumerate(eval_items(env["sample"])[:6]):
        (root / f"{i}.jpg").write_bytes(jpg)
        rows.append(f"{i}.jpg,{[0, 1, 999][i % 3]}")
    (root / "val.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert (
        eval_cli(
            env, out, "--data", f"in={root / 'val.csv'}", "--classes", "imagenet", "--templates", "simple-imagenet"
        )
        == 0
    )
    task = json.loads((out / "results.json").read_text())["tasks"]["in"]
    assert (task["n_images"], task["n_classes"], task["n_templates"]) == (6, 1000, 7)
    assert sum(task["classes_per_expert"]) == 1000
    assert all(0 <= v <= 1 for v in task["top5"].values())
    # bad values name the option, the value and the built-in names
    assert eval_cli(env, tmp_path / "bad", "--data", str(root / "val.csv"), "--classes", "imagenet2") == 2
    assert "--classes imagenet2: no such file, and not a built-in name (imagenet)" in capsys.readouterr().err
    assert (
        eval_cli(
            env, tmp_path / "bad", "--data", str(root / "val.csv"), "--classes", "imagenet", "--templates", "openai"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--templates openai: no such file" in err and "openai-imagenet, simple-imagenet" in err
    assert not (tmp_path / "bad").exists()


def test_damaged_shard_is_read_past_and_the_skip_reported(env, tmp_path):
    """One damaged header (the middle member of sample 5 of 48): eval scores the other 47
    images and pairs and says what it skipped in results.json and results.md."""
    classes = json.loads((env["sample"] / "eval" / "classes.json").read_text())
    folder = tmp_path / "damaged"
    folder.mkdir()
    shard = folder / "d-000.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, (jpg, y) in enumerate(eval_items(env["sample"])):
            for ext, data in (("jpg", jpg), ("cls", str(y).encode()), ("txt", f"a photo of a {classes[y]}".encode())):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (folder / "classes.json").write_text(json.dumps(classes))
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        offset = tf.getmembers()[3 * 5 + 1].offset
    data[offset : offset + 100] = b"\x07" * 100  # the header's checksum no longer matches
    shard.write_bytes(bytes(data))

    out = tmp_path / "out"
    assert eval_cli(env, out, "--data", f"dmg={folder}", "--retrieval", f"dmgr={folder}") == 0
    res = json.loads((out / "results.json").read_text())
    task, pairs = res["tasks"]["dmg"], res["retrieval"]["dmgr"]
    assert task["n_images"] == 47 and pairs["n_pairs"] == 47
    for t in (task, pairs):
        assert t["skipped_total"] == 1 and t["skipped"] == {"corrupt_member": 1}
        assert t["skipped_by_shard"] == {str(shard): {"corrupt_member": 1}}
    md = (out / "results.md").read_text()
    assert "- dmg: read 47, skipped 1 (corrupt_member 1)" in md and "- dmgr: read 47, skipped 1" in md


def test_wrong_retrieval_caption_key_is_one_line(env, tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    with tarfile.open(folder / "r-000.tar", "w") as tf:
        for ext, data in (("jpg", eval_items(env["sample"])[0][0]), ("json", b'{"text": "a dog", "id": 1}')):
            info = tarfile.TarInfo(f"k0.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert eval_cli(env, tmp_path / "out", "--retrieval", str(folder)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert "--caption-key 'caption'" in lines[0] and "k0" in lines[0] and ".json fields id, text" in lines[0]


def test_run_json_args_are_the_configs_result_changing_flags(env, tmp_path):
    """The parser comes from EvalConfig's fields; run.json records exactly the result-changing
    ones (eval adds no derived entry), and each has a rerun rule."""
    import argparse

    from mode_fast.core.config import config_from_args, result_flags
    from mode_fast.evaluation.run import RECOMPUTE_ARGS, EvalConfig, run_evaluation
    from mode_fast.jobs import eval as eval_job

    parser = argparse.ArgumentParser()
    eval_job.add_arguments(parser)
    argv = ["--run", str(env["run"]), "--clusters", str(env["clusters"]), "--out", str(tmp_path / "out")]
    args = parser.parse_args([*argv, "--batch-size", "16", "--data", f"sample={env['sample']}"])
    run_evaluation(config_from_args(EvalConfig, args))
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["args"]
    assert set(recorded) == result_flags(EvalConfig)
    assert recorded["--baseline"] == [] and recorded["--batch-size"] == 16  # the flag, not the field name
    assert set(RECOMPUTE_ARGS) == result_flags(EvalConfig)


def test_old_evaluate_entry_warns_and_matches_the_cli(env, tmp_path):
    """0.1's `mode_fast.evaluate.evaluate(EvalConfig(...))` still runs for one release: the
    config built in Python equals the CLI's, so after the CLI's run it is a no-op."""
    import warnings

    out = tmp_path / "out"
    assert eval_cli(env, out, "--data", f"sample={env['sample']}") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old module name warns too
        from mode_fast.evaluate import EvalConfig, evaluate
    cfg = EvalConfig(run=env["run"], clusters=env["clusters"], data=[f"sample={env['sample']}"], out=out, batch_size=16)
    before = (out / "run.json").read_bytes()
    with pytest.warns(DeprecationWarning, match="run_evaluation"):
        results = evaluate(cfg)
    assert results == json.loads((out / "results.json").read_text())
    assert (out / "run.json").read_bytes() == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": ()}, "nothing to evaluate: give --data SPEC... and/or --retrieval SHARDS..."),
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"max_bad_share": 1.5}, r"--max-bad-share must be in \[0, 1\], got 1.5"),
        ({"ensemble_inputs": "sum"}, "--ensemble-inputs must be one of cosine, scaled, got 'sum'"),
    ],
)
def test_eval_config_checks_its_fields_from_python(tmp_path, change, message):
    from mode_fast.core.errors import ConfigError
    from mode_fast.evaluation.run import EvalConfig

    base = {"run": tmp_path, "clusters": tmp_path, "data": ["x"], "out": tmp_path}
    assert EvalConfig(**base).data == ("x",)  # a list from Python is kept as a tuple: the config is frozen
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**{**base, **change})
