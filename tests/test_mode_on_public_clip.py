"""The three user paths end to end: MoDE on a public CLIP (two experts forked from an open_clip
model saved to a local file), exported, loaded back by open_clip and by ModeEnsemble, with the
same zero-shot numbers as `mode-fast eval` on the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_fast import ModeEnsemble, cli
from mode_fast.demo.sample import write_sample
from mode_fast.evaluation.tasks import load_task
from mode_fast.training.models import register_model_configs

torch.set_num_threads(1)  # shared 2-core machine

MODEL = "mode-fast-tiny"
TRAIN = ["--model", MODEL, "--batch-size", "8", "--steps", "2", "--warmup", "1", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("public_clip")
    sample = root / "sample"
    write_sample(sample, num_pairs=64, shard_size=32, eval_pairs=32, image_size=32)
    # "the public CLIP": an open_clip model, saved as a user would download it
    register_model_configs()
    torch.manual_seed(7)
    public = open_clip.create_model(MODEL, pretrained=None)
    save_file({k: v.contiguous() for k, v in public.state_dict().items()}, str(root / "public.safetensors"))
    clusters = root / "clusters"
    assert cli.main(["cluster", str(sample / "pool"), "--out", str(clusters), "--fine-k", "4", "--experts", "2",
                     "--sample", "64", "--embedder", "hash64", "--no-progress"]) == 0  # fmt: skip
    spec = f"{MODEL}:{root / 'public.safetensors'}"
    for k in (0, 1):
        argv = ["train", "--data", str(sample / "pool"), "--out", str(root / "run"), "--expert", str(k)]
        assert cli.main([*argv, "--clusters", str(clusters), "--seed-checkpoint", spec, *TRAIN]) == 0
    assert cli.main(["export", "--run", str(root / "run"), "--clusters", str(clusters), "--out", str(root / "x")]) == 0
    ev = ["eval", "--run", str(root / "run"), "--clusters", str(clusters), "--out", str(root / "eval")]
    assert cli.main([*ev, "--batch-size", "16", "--data", f"sample={sample}", "--baseline", f"public={spec}"]) == 0
    return {"root": root, "sample": sample, "run": root / "run", "export": root / "x", "eval": root / "eval"}


def test_experts_forked_from_a_local_open_clip_file_load_back_in_open_clip(paths):
    import open_clip

    register_model_configs()
    doc = json.loads((paths["export"] / "ensemble.json").read_text())
    assert doc["experts"] == ["expert_0", "expert_1"]
    for k in (0, 1):
        model = open_clip.create_model(MODEL, pretrained=str(paths["export"] / f"expert_{k}.safetensors"))
        trained = torch.load(paths["run"] / f"expert_{k}" / "checkpoints" / "final.pt", weights_only=True)
        got = model.state_dict()
        assert sorted(got) == sorted(trained["state_dict"])
        assert all(torch.equal(got[n], t) for n, t in trained["state_dict"].items())
        # they trained: not the file's weights any more, but forked from them (run.json fingerprints it)
        manifest = json.loads((paths["run"] / f"expert_{k}" / "run.json").read_text())
        assert manifest["inputs"]["seed checkpoint"]["size"] == (paths["root"] / "public.safetensors").stat().st_size


def test_mode_ensemble_of_the_export_gives_evals_numbers(paths):
    res = json.loads((paths["eval"] / "results.json").read_text())["tasks"]["sample"]
    task = load_task(f"sample={paths['sample']}", None, None, "label")
    items = list(task.items())
    images, labels = [load() for load, _ in items], np.array([y for _, y in items])
    assert labels.tolist() == res["labels"]
    out = ModeEnsemble.load(paths["export"]).zero_shot(images, task.classes, task.templates, batch_size=16)
    assert out.weights.tolist() == res["expert_weights"]
    for name, logits in out.expert_logits.items():
        assert (logits.argmax(1) == labels).astype(int).tolist() == res["correct"][name]
    assert (out.predictions == labels).astype(int).tolist() == res["correct"]["mode_ensemble"]
    assert float((out.predictions == labels).mean()) == res["top1"]["mode_ensemble"]
    assert "public" in res["top1"]  # the public CLIP itself, as the --baseline spec
