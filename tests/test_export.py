"""`mode-fast export` and `mode_fast.ModeEnsemble` on a tiny run (a seed and 2 random-init
mode-fast-tiny experts, hash64 clusters, the sample's eval split): each exported model is its
checkpoint in open_clip, the ensemble's zero-shot numbers are the ones `mode-fast eval` wrote
for the run, eval on the export folder gives the run's results, reruns, and the errors."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import MODEL, make_centers, save_random_model

from mode_fast import ModeEnsemble, cli
from mode_fast.core.errors import InputError
from mode_fast.demo.sample import write_sample
from mode_fast.evaluation.tasks import load_task
from mode_fast.training.models import register_model_configs

torch.set_num_threads(1)  # shared 2-core machine

N_EXPERTS = 2
NAMES = ["seed", "expert_0", "expert_1"]


def make_run(run: Path) -> Path:
    save_random_model(run / "seed" / "checkpoints" / "final.pt", 100)
    for k in range(N_EXPERTS):
        save_random_model(run / f"expert_{k}" / "checkpoints" / "final.pt", k)
    return run


def export_cli(run: Path, clusters: Path, out: Path, *extra: str) -> int:
    return cli.main(["export", "--run", str(run), "--clusters", str(clusters), "--out", str(out), *extra])


def eval_cli(run: Path, out: Path, sample: Path, *extra: str) -> int:
    args = ["eval", "--run", str(run), "--out", str(out), "--batch-size", "16", "--data", f"sample={sample}"]
    return cli.main([*args, *extra])


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    write_sample(root / "sample", num_pairs=40, shard_size=20, eval_pairs=48, image_size=32)
    run = make_run(root / "run")
    make_centers(root / "clusters", n_experts=N_EXPERTS)
    assert eval_cli(run, root / "eval_run", root / "sample", "--clusters", str(root / "clusters")) == 0
    assert export_cli(run, root / "clusters", root / "export") == 0
    return {
        "root": root,
        "sample": root / "sample",
        "run": run,
        "clusters": root / "clusters",
        "export": root / "export",
        "results": root / "eval_run" / "results.json",
    }


def test_each_exported_model_is_its_checkpoint_in_open_clip(env):
    import open_clip
    from safetensors import safe_open

    register_model_configs()  # mode-fast-tiny is this project's config
    doc = json.loads((env["export"] / "ensemble.json").read_text())
    assert [m["name"] for m in doc["models"]] == NAMES and doc["experts"] == ["expert_0", "expert_1"]
    for entry in doc["models"]:
        path = env["export"] / entry["file"]
        assert entry["architecture"] == MODEL and entry["model_kwargs"] == {}
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["mode_fast"])
        assert meta == {"architecture": MODEL, "model_kwargs": {}, "model": entry["name"]}
        model = open_clip.create_model(MODEL, pretrained=str(path))
        ckpt = env["run"] / entry["name"] / "checkpoints" / "final.pt"
        expected = torch.load(ckpt, weights_only=True)["state_dict"]
        got = model.state_dict()
        assert sorted(got) == sorted(expected)
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), (entry["name"], key)
    # the ensemble's arrays: the cluster folder's centers byte for byte, the embedder spec resolved
    assert (env["export"] / "centers.npz").read_bytes() == (env["clusters"] / "centers.npz").read_bytes()
    assert doc["embedder_spec"] == {"kind": "hash", "dim": 64} and doc["temperature"] == 8.0
    assert not list(env["export"].glob(".*tmp")), "temporaries left behind"


def _sample_task(sample: Path):
    task = load_task(f"sample={sample}", None, None, "label")
    items = list(task.items())
    return task, [load() for load, _ in items], np.array([y for _, y in items])


def test_mode_ensemble_gives_evals_numbers(env):
    """The same images, templates and batch size as eval: the weights, every expert's cosines
    and the ensemble's predictions are eval's bit for bit (the same functions compute them on
    the same float32 weights)."""
    res = json.loads(env["results"].read_text())["tasks"]["sample"]
    task, images, labels = _sample_task(env["sample"])
    assert labels.tolist() == res["labels"]
    ens = ModeEnsemble.load(env["export"])
    assert len(ens.experts) == N_EXPERTS and ens.seed is not None
    assert all(type(m).__name__ == "CLIP" for m in ens.experts)
    out = ens.zero_shot(images, task.classes, task.templates, batch_size=16)
    assert out.weights.tolist() == res["expert_weights"]
    assert ens.weights(task.classes, task.templates).tolist() == res["expert_weights"]
    for name, cos in out.expert_logits.items():
        with np.load(env["root"] / "eval_run" / "scores" / "sample" / f"model-{name}.npz") as z:
            assert np.array_equal(cos, z["scores"]), name
        assert (cos.argmax(1) == labels).astype(int).tolist() == res["correct"][name]
    assert (out.predictions == labels).astype(int).tolist() == res["correct"]["mode_ensemble"]
    assert float((out.predictions == labels).mean()) == res["top1"]["mode_ensemble"]
    # and independently of scoring's combination: MoDE's weighted sum of the experts' cosines
    manual = sum(w * out.expert_logits[f"expert_{k}"].astype(np.float64) for k, w in enumerate(out.weights))
    np.testing.assert_allclose(out.logits, manual, rtol=1e-12, atol=0)


def test_eval_on_the_export_gives_the_runs_results(env, tmp_path):
    assert eval_cli(env["export"], tmp_path / "e", env["sample"]) == 0  # no --clusters: the export's
    ours = json.loads((tmp_path / "e" / "results.json").read_text())
    theirs = json.loads(env["results"].read_text())
    for key in ("tasks", "average", "logit_scales", "n_experts", "embedder", "single_models"):
        assert ours[key] == theirs[key], key


def test_rerun_is_a_noop_and_a_changed_checkpoint_stops(env, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    out = tmp_path / "export"
    assert export_cli(run, env["clusters"], out) == 0
    # run.json is rewritten (the same bytes) by every run; the outputs are not touched
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in (".lock", "run.json")}
    manifest = (out / "run.json").read_text()
    with caplog.at_level(logging.WARNING, logger="mode_fast"):
        assert export_cli(run, env["clusters"], out) == 0
    assert "already holds this export" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps
    assert (out / "run.json").read_text() == manifest
    # a lost model file is redone alone, to the same bytes (run.json's units, as after a kill)
    sha = hashlib.sha256((out / "expert_1.safetensors").read_bytes()).hexdigest()
    (out / "expert_1.safetensors").unlink()
    assert export_cli(run, env["clusters"], out) == 0
    assert hashlib.sha256((out / "expert_1.safetensors").read_bytes()).hexdigest() == sha
    for name in ("seed.safetensors", "expert_0.safetensors"):
        assert (out / name).stat().st_mtime_ns == stamps[name]
    save_random_model(run / "expert_1" / "checkpoints" / "final.pt", 7)  # retrained
    capsys.readouterr()
    assert export_cli(run, env["clusters"], out) == 2
    err = capsys.readouterr().err.strip()
    assert "expert_1/checkpoints/final.pt" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert export_cli(run, env["clusters"], out, "--overwrite") == 0
    ens = ModeEnsemble.load(out)
    retrained = torch.load(run / "expert_1" / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ens.expert(1).state_dict()[k], v) for k, v in retrained.items())


def test_run_errors_are_one_line(env, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    (run / "expert_1" / "checkpoints" / "final.pt").unlink()
    assert export_cli(run, env["clusters"], tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "expert_1/checkpoints/final.pt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists(), "a refused export leaves nothing"

    seed_only = tmp_path / "seed_only"
    shutil.copytree(env["run"] / "seed", seed_only / "seed")
    assert export_cli(seed_only, env["clusters"], tmp_path / "b") == 2
    assert "holds no expert_K folders" in capsys.readouterr().err

    assert eval_cli(env["run"], tmp_path / "c", env["sample"]) == 2  # a run folder still needs --clusters
    assert "--clusters is required" in capsys.readouterr().err


def _copy_export(env, dst: Path) -> Path:
    shutil.copytree(env["export"], dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_a_bad_export_folder_is_refused(env, tmp_path):
    with pytest.raises(InputError, match="holds no ensemble.json"):
        ModeEnsemble.load(tmp_path)
    bad = _copy_export(env, tmp_path / "escape")
    doc = json.loads((bad / "ensemble.json").read_text())
    doc["models"][1]["file"] = "../outside.safetensors"
    (bad / "ensemble.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="lies outside"):
        ModeEnsemble.load(bad)
    bad = _copy_export(env, tmp_path / "arch")
    doc = json.loads((bad / "ensemble.json").read_text())
    doc["models"][0]["architecture"] = "hf-hub:someone/model"
    (bad / "ensemble.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="not an architecture in open_clip's registry"):
        ModeEnsemble.load(bad)
    bad = _copy_export(env, tmp_path / "changed")
    data = bytearray((bad / "expert_0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "expert_0.safetensors").write_bytes(bytes(data))
    ens = ModeEnsemble.load(bad)  # the models load on first use
    with pytest.raises(InputError, match="does not have the sha256"):
        ens.expert(0)
    bad = _copy_export(env, tmp_path / "json")
    (bad / "ensemble.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot be read"):
        ModeEnsemble.load(bad)


def test_a_siglip_run_without_a_seed_exports_its_kwargs(env, tmp_path, capsys):
    """A sigmoid-loss model carries init_logit_scale/bias: ensemble.json records them and open_clip
    needs them to build the logit_bias the file holds. A run without RUN/seed exports its experts."""
    import open_clip

    from mode_fast.training.checkpoint import CHECKPOINT_FORMAT
    from mode_fast.training.models import model_kwargs

    register_model_configs()
    kwargs = model_kwargs(siglip=True)
    run = tmp_path / "run"
    for k in range(N_EXPERTS):
        torch.manual_seed(k)
        model = open_clip.create_model(MODEL, pretrained=None, **kwargs)
        ckpt = run / f"expert_{k}" / "checkpoints" / "final.pt"
        ckpt.parent.mkdir(parents=True)
        state = {"format": CHECKPOINT_FORMAT, "model_name": MODEL, "model_kwargs": kwargs}
        torch.save(state | {"state_dict": model.state_dict()}, ckpt)
    assert export_cli(run, env["clusters"], tmp_path / "export") == 0
    doc = json.loads((tmp_path / "export" / "ensemble.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["expert_0", "expert_1"]
    for entry in doc["models"]:
        assert entry["model_kwargs"] == kwargs
        loaded = open_clip.create_model(
            MODEL, pretrained=str(tmp_path / "export" / entry["file"]), **entry["model_kwargs"]
        )
        assert float(loaded.logit_bias.detach()) == -10.0
    ens = ModeEnsemble.load(tmp_path / "export")
    assert ens.seed is None and float(ens.expert(1).logit_bias.detach()) == -10.0
    assert eval_cli(tmp_path / "export", tmp_path / "e", env["sample"]) == 2
    assert "has no seed model: pass --baseline CKPT" in capsys.readouterr().err
