"""Pretrained in: `train --pretrained SPEC` for the seed, `--seed-checkpoint SPEC` for experts and
`eval --baseline NAME=SPEC`, from an open_clip model saved to local files (a state_dict, open_clip's
training checkpoint, .safetensors) or found by tag in a local cache laid out as open_clip's
downloads leave it. Offline: nothing here downloads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import eval_cli, make_centers, save_random_model
from test_loader import key_topic, make_shards, write_assignments

from mode_fast import cli
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.demo.sample import write_sample
from mode_fast.jobs import train as train_job
from mode_fast.training.checkpoint import CHECKPOINT_FORMAT, Pretrained, parse_model_spec
from mode_fast.training.models import register_model_configs
from mode_fast.training.run import TrainConfig, run_training

torch.set_num_threads(1)  # shared 2-core machine

MODEL = "mode-fast-tiny"
# --lr 0: AdamW moves no weight (its decay is scaled by the lr too), so the job's final weights
# are the ones it started from, which is what these tests compare with the file's.
BASE = ["--model", MODEL, "--batch-size", "16", "--warmup", "2", "--lr", "0", "--workers", "0", "--no-progress"]


def run_train(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    return run_training(TrainConfig.from_args(parser.parse_args(BASE + argv)))


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def open_clip_model(name: str = MODEL, seed: int = 3) -> torch.nn.Module:
    import open_clip

    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, object]:
    """One open_clip model (seed 3, not the train job's init) saved three ways."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    sd = {k: v.clone() for k, v in open_clip_model().state_dict().items()}
    torch.save(sd, root / "plain.pt")
    # open_clip_train's checkpoint: epoch, name, DDP's "module." keys, the optimizer
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
         "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
        root / "epoch_3.pt",
    )  # fmt: skip
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "model.safetensors"))
    return {"sd": sd, "root": root}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """120 pairs in 2 shards, clustered by topic into 4 experts."""
    root = tmp_path_factory.mktemp("pool")
    shards = make_shards(root / "shards", n=120, per_shard=64)
    write_assignments(root / "clusters", shards, key_topic)
    return root


# --------------------------------------------------------------------------- the seed
@pytest.mark.parametrize("name", ["plain.pt", "epoch_3.pt", "model.safetensors"])
def test_seed_starts_from_the_files_weights(weights, pool, tmp_path, name):
    path = weights["root"] / name
    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "1",
                       "--pretrained", f"{MODEL}:{path}"])  # fmt: skip
    assert_same(final_weights(final), weights["sd"])
    manifest = json.loads((tmp_path / "seed" / "run.json").read_text())
    assert manifest["inputs"]["pretrained"]["path"] == f"{MODEL}:{path}"
    assert manifest["inputs"]["pretrained"]["size"] == path.stat().st_size
    assert manifest["args"]["--pretrained"] == f"{MODEL}:{path}"


def test_bare_file_is_models_weights_and_without_the_flag_nothing_is_recorded(weights, pool, tmp_path):
    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path / "a"), "--steps", "1",
                       "--pretrained", str(weights["root"] / "plain.pt")])  # fmt: skip
    assert_same(final_weights(final), weights["sd"])
    scratch = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path / "b"), "--steps", "1"])
    assert not torch.equal(final_weights(scratch)["positional_embedding"], weights["sd"]["positional_embedding"])
    manifest = json.loads((tmp_path / "b" / "seed" / "run.json").read_text())
    assert "pretrained" not in manifest["inputs"] and "--pretrained" not in manifest["args"]  # result=ADDED


def test_siglip_seed_from_clip_weights_keeps_its_bias_init(weights, pool, tmp_path):
    """open_clip's rule (its issue #712): a SigLIP model loading a CLIP's weights (no logit_bias)
    keeps its own bias init, -10 (SigLIP's paper); everything else is the file's."""
    final = final_weights(run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "1",
                                     "--siglip", "--pretrained", str(weights["root"] / "plain.pt")]))  # fmt: skip
    assert final.pop("logit_bias").item() == -10.0
    assert_same(final, weights["sd"])


# --------------------------------------------------------------------------- experts
@pytest.mark.parametrize("spec", ["{root}/plain.pt", MODEL + ":{root}/model.safetensors"])
def test_two_experts_fork_from_the_file_with_a_fresh_schedule(weights, pool, tmp_path, spec):
    from open_clip_train.scheduler import cosine_lr

    spec = spec.format(root=weights["root"])
    for k in (0, 1):
        final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--expert", str(k),
                           "--clusters", str(pool / "clusters"), "--seed-checkpoint", spec, "--steps", "2",
                           "--lr", "1e-3"])  # fmt: skip
        ckpt = torch.load(final, map_location="cpu", weights_only=True)
        # the expert's own schedule: --steps long, from step 0, warm-up included
        assert (ckpt["schedule_step"], ckpt["schedule_total"], ckpt["job_steps"]) == (2, 2, 2)
        rows = [json.loads(x) for x in (tmp_path / f"expert_{k}" / "metrics.jsonl").read_text().splitlines()]
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        reference = cosine_lr(opt, 1e-3, 2, 2)
        assert [r["lr"] for r in rows] == pytest.approx([reference(0), reference(1)])
        # a fresh AdamW: two steps of state, not a seed's
        assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}
        manifest = json.loads((tmp_path / f"expert_{k}" / "run.json").read_text())
        assert manifest["inputs"]["seed checkpoint"]["size"] == Path(spec.split(":")[-1]).stat().st_size


def test_expert_from_the_file_starts_at_its_weights(weights, pool, tmp_path):
    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--expert", "2",
                       "--clusters", str(pool / "clusters"), "--steps", "1",
                       "--seed-checkpoint", str(weights["root"] / "epoch_3.pt")])  # fmt: skip
    assert_same(final_weights(final), weights["sd"])


def test_train_checkpoint_seed_still_continues_its_schedule(pool, tmp_path):
    run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "2", "--schedule-steps", "5"])
    seed = tmp_path / "seed" / "checkpoints" / "final.pt"
    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--expert", "0",
                       "--clusters", str(pool / "clusters"), "--seed-checkpoint", str(seed)])  # fmt: skip
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert (ckpt["schedule_step"], ckpt["schedule_total"], ckpt["job_steps"]) == (5, 5, 3)


def test_pretrained_is_for_the_seed(pool, tmp_path):
    with pytest.raises(ConfigError, match="--pretrained is for the seed"):
        TrainConfig(data=("x",), out=tmp_path, stage="expert", expert=0, clusters=pool / "clusters", pretrained="x.pt")


# --------------------------------------------------------------------------- errors
def _seed_error(pool: Path, out: Path, spec: str, *extra: str) -> str:
    with pytest.raises((InputError, ConfigError)) as e:
        run_train(["--data", str(pool / "shards"), "--out", str(out), "--steps", "1", "--pretrained", spec, *extra])
    assert not (out / "seed").exists()  # refused before any output
    text = str(e.value)
    assert "\n" not in text
    return text


def test_missing_file_is_named(pool, tmp_path):
    assert "nope.pt not found" in _seed_error(pool, tmp_path, f"{MODEL}:{tmp_path}/nope.pt")


def test_other_architecture_is_refused_in_one_line(pool, tmp_path):
    path = tmp_path / "small.pt"
    torch.save(open_clip_model("mode-fast-small").state_dict(), path)
    err = _seed_error(pool, tmp_path / "out", str(path))
    assert "do not fit" in err and "of another shape" in err
    assert "not --model" in _seed_error(pool, tmp_path / "out", f"mode-fast-small:{path}")


def test_pickled_objects_are_refused(weights, pool, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": weights["sd"], "args": argparse.Namespace(lr=1)}, path)
    err = _seed_error(pool, tmp_path / "out", f"{MODEL}:{path}")
    assert "argparse.Namespace" in err and "weights only" in err


def test_tag_not_in_the_cache_names_it_and_where_it_looked(pool, tmp_path):
    err = _seed_error(pool, tmp_path, "ViT-B-32:laion2b_s34b_b79k", "--model", "ViT-B-32", "--cache-dir",
                      str(tmp_path / "cache"))  # fmt: skip
    assert "ViT-B-32:laion2b_s34b_b79k is not in the local cache" in err
    assert str(tmp_path / "cache" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in err
    assert "no pretrained tag 'nosuchtag'" in _seed_error(pool, tmp_path, f"{MODEL}:nosuchtag")
    assert "ViT-B-32-quickgelu:openai" in _seed_error(pool, tmp_path, "ViT-B-32:openai", "--model", "ViT-B-32")


@pytest.fixture
def tiny_tags(monkeypatch):
    """Two pretrained tags for mode-fast-tiny in open_clip's registry: one on the hub, one by URL."""
    import open_clip.pretrained as pretrained

    tags = {"hubtag": {"hf_hub": "org/tiny-clip/"}, "urltag": {"url": "https://example.org/w/tiny-abc.pt"}}
    monkeypatch.setitem(pretrained._PRETRAINED, MODEL, tags)


def test_tags_resolve_from_a_local_cache_as_open_clip_leaves_it(weights, pool, tmp_path, tiny_tags):
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    snapshot = cache / "models--org--tiny-clip" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (cache / "models--org--tiny-clip" / "refs").mkdir()
    (cache / "models--org--tiny-clip" / "refs" / "main").write_text("0123abc")
    # open_clip prefers the .safetensors twin of the hub's default file
    save_file({k: v.contiguous() for k, v in weights["sd"].items()}, str(snapshot / "open_clip_model.safetensors"))
    hub = parse_model_spec(f"{MODEL}:hubtag", MODEL, cache)
    assert isinstance(hub, Pretrained) and hub.path == snapshot / "open_clip_model.safetensors"
    (cache / "tiny-abc.pt").write_bytes((weights["root"] / "plain.pt").read_bytes())
    assert parse_model_spec("urltag", MODEL, cache) == Pretrained(MODEL, cache / "tiny-abc.pt", "urltag")

    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path / "run"), "--steps", "1",
                       "--pretrained", "hubtag", "--cache-dir", str(cache)])  # fmt: skip
    assert_same(final_weights(final), weights["sd"])
    manifest = json.loads((tmp_path / "run" / "seed" / "run.json").read_text())
    assert manifest["inputs"]["pretrained"]["path"] == f"{MODEL}:hubtag ({hub.path})"


# --------------------------------------------------------------------------- eval --baseline
@pytest.fixture(scope="module")
def eval_env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    write_sample(root / "sample", num_pairs=40, shard_size=20, eval_pairs=24, image_size=32)
    for k in range(3):
        save_random_model(root / "run" / f"expert_{k}" / "checkpoints" / "final.pt", k)
    make_centers(root / "clusters")
    return {"root": root, "sample": root / "sample", "run": root / "run", "clusters": root / "clusters"}


def test_eval_baseline_takes_a_file_spec(weights, eval_env, tmp_path):
    # the same weights as a train checkpoint: the reference the spec's scores must equal
    ref = tmp_path / "ref.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": MODEL, "state_dict": weights["sd"]}, ref)
    out = tmp_path / "out"
    spec = f"{MODEL}:{weights['root'] / 'model.safetensors'}"
    assert eval_cli(eval_env, out, "--data", str(eval_env["sample"]), "--baseline", f"ref={ref}",
                    "--baseline", f"tiny={spec}", "--baseline", f"{MODEL}:{weights['root'] / 'epoch_3.pt'}") == 0  # fmt: skip
    (task,) = json.loads((out / "results.json").read_text())["tasks"].values()
    assert task["top1"]["tiny"] == task["top1"]["ref"] == task["top1"][f"{MODEL}-epoch_3"]
    (folder,) = (out / "scores").iterdir()
    scores = {n: np.load(folder / f"model-{n}.npz") for n in ("ref", "tiny")}
    assert scores["ref"].files
    for key in scores["ref"].files:
        np.testing.assert_array_equal(scores["ref"][key], scores["tiny"][key])
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["inputs"]["model tiny"]["path"] == spec


def test_eval_baseline_tag_not_in_the_cache_is_one_line(eval_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = cli.main(["eval", "--run", str(eval_env["run"]), "--clusters", str(eval_env["clusters"]),
                     "--out", str(tmp_path / "out"), "--data", str(eval_env["sample"]),
                     "--baseline", "ViT-B-32:laion2b_s34b_b79k"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("ViT-B-32:laion2b_s34b_b79k is not in the local cache" in line for line in err)
