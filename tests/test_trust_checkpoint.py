"""Checkpoints are data: crafted files that would run code, pick files to load or break a
reader's types are refused with one line (exit 2 through the CLI), and nothing in them runs.

Each crafted file carries a payload that, were it unpickled or reached, would create a
marker file; every test asserts the marker is absent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_evaluate import make_centers, save_random_model
from test_job_errors import TRAIN, error_line
from test_loader import make_shards

from mode_fast import cli
from mode_fast.core.errors import InputError
from mode_fast.training.checkpoint import RESUME_FIELDS, load_checkpoint, load_model

torch.set_num_threads(1)  # shared 2-core machine


class Touch:
    """Pickles as a call of `func` that creates `marker` (subprocess.run or os.system)."""

    def __init__(self, func, marker: Path) -> None:
        self.func, self.marker = func, marker

    def __reduce__(self):
        if self.func is subprocess.run:
            return (subprocess.run, (["touch", str(self.marker)],))
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A checkpoint as eval reads it (format, model_name, model_kwargs, state_dict)."""
    path = save_random_model(tmp_path_factory.mktemp("good") / "good.pt", 7)
    return torch.load(path, weights_only=True)


def crafted(path: Path, base: dict, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**base, **fields}, path)
    return path


def payload(tmp_path: Path) -> tuple[Path, Path]:
    """(a file that runs `touch MARKER` when unpickled without restriction, MARKER)."""
    marker = tmp_path / "MARKER"
    torch.save(Touch(os.system, marker), tmp_path / "payload.pt")
    return tmp_path / "payload.pt", marker


# --------------------------------------------------------------------------- load_model
def test_model_kwargs_outside_the_whitelist_are_refused_and_nothing_is_unpickled(good, tmp_path):
    pay, marker = payload(tmp_path)
    # open_clip reads these two: weights_only=False would unpickle pretrained_image_path
    ckpt = crafted(tmp_path / "kw.pt", good, model_kwargs={"weights_only": False, "pretrained_image_path": str(pay)})
    with pytest.raises(InputError) as e:
        load_model(ckpt)
    assert str(e.value) == f"checkpoint {ckpt}: model_kwargs key 'weights_only' is not one mode-fast writes; refused"
    assert not marker.exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"init_logit_scale": float("nan")}, "model_kwargs 'init_logit_scale' is not a finite number (nan)"),
        ({"init_logit_bias": "-10"}, "model_kwargs 'init_logit_bias' is not a finite number ('-10')"),
        ({"init_logit_bias": True}, "model_kwargs 'init_logit_bias' is not a finite number (True)"),
        ({"cache_dir": "/tmp"}, "model_kwargs key 'cache_dir' is not one mode-fast writes"),
        ([1, 2], "model_kwargs is not a dict (got list)"),
    ],
)
def test_model_kwargs_types_are_checked(good, tmp_path, kwargs, message):
    ckpt = crafted(tmp_path / "kw.pt", good, model_kwargs=kwargs)
    with pytest.raises(InputError, match="^" + f"checkpoint {ckpt}: {message}".replace("(", r"\(").replace(")", r"\)")):
        load_model(ckpt)


def test_the_siglip_kwargs_mode_fast_writes_are_taken(good, tmp_path):
    sd = dict(good["state_dict"], logit_bias=torch.tensor(-3.0))
    kwargs = {"init_logit_scale": 2.302585, "init_logit_bias": -10}
    model, _, _ = load_model(crafted(tmp_path / "siglip.pt", good, model_kwargs=kwargs, state_dict=sd))
    assert float(model.logit_bias.detach()) == -3.0  # a SigLIP model, with the checkpoint's weights, not the init


@pytest.mark.parametrize("name", ["hf-hub:timm/ViT-B-16-SigLIP", "local-dir:{tmp}", "no-such-architecture", 7])
def test_model_names_outside_the_registry_are_refused(good, tmp_path, name):
    if isinstance(name, str):
        name = name.format(tmp=tmp_path)
    ckpt = crafted(tmp_path / "name.pt", good, model_name=name)
    with pytest.raises(InputError) as e:
        load_model(ckpt)
    assert str(e.value) == (
        f"checkpoint {ckpt}: model_name {name!r} is not an architecture in open_clip's registry "
        "(names from open_clip.list_models(), no 'hf-hub:' or 'local-dir:' source); refused"
    )


@pytest.mark.parametrize("func,shown", [(subprocess.run, "subprocess.run"), (os.system, f"{os.name}.system")])
def test_pickled_objects_are_named_not_called_damage(good, tmp_path, func, shown):
    marker = tmp_path / "MARKER"
    ckpt = crafted(tmp_path / "obj.pt", good, extra=Touch(func, marker))
    with pytest.raises(InputError) as e:
        load_model(ckpt)
    assert str(e.value) == f"checkpoint {ckpt} holds pickled objects of type {shown}; mode-fast loads weights only"
    assert "weights_only" not in str(e.value) and not marker.exists()


def test_a_state_dict_of_the_wrong_shape_is_one_line(good, tmp_path):
    sd = dict(good["state_dict"], logit_scale=torch.zeros(3))
    ckpt = crafted(tmp_path / "shape.pt", good, state_dict=sd)
    with pytest.raises(InputError, match=f"^checkpoint {ckpt}: its state_dict does not fit mode-fast-tiny"):
        load_model(ckpt)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"job_step": "3"}, "field 'job_step' is not a step count (got str); refused"),
        ({"job_step": -1}, "field 'job_step' is not a step count (got int); refused"),
        ({"schedule_total": torch.tensor(5)}, "field 'schedule_total' is not a step count (got Tensor); refused"),
        ({"state_dict": {"w": [1.0]}}, "field 'state_dict' is not a dict of tensors (got dict); refused"),
        ({"config": {"lr": torch.ones(2)}}, "field 'config' is not a dict of plain values (got dict); refused"),
        ({"stage": "root"}, "field 'stage' is not 'seed' or 'expert' (got str); refused"),
        ({"job_step": 5, "job_steps": 4}, "its step positions {'job_step': 5, 'job_steps': 4} do not fit together"),
    ],
)
def test_fields_are_checked_for_type(good, tmp_path, fields, message):
    ckpt = crafted(tmp_path / "f.pt", good, **fields)
    with pytest.raises(InputError) as e:
        load_checkpoint(ckpt)
    assert str(e.value).startswith(f"checkpoint {ckpt}: {message}")


def test_a_missing_field_is_named(good, tmp_path):
    ckpt = crafted(tmp_path / "f.pt", good)
    with pytest.raises(InputError) as e:
        load_checkpoint(ckpt, RESUME_FIELDS)
    assert str(e.value) == f"checkpoint {ckpt}: field 'optimizer' is missing (not a checkpoint mode-fast's train wrote)"


# --------------------------------------------------------------------------- eval, end to end
@pytest.fixture(scope="module")
def eval_env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust-eval")
    run = root / "run"
    for k in range(2):
        save_random_model(run / f"expert_{k}" / "checkpoints" / "final.pt", k)
    make_centers(root / "clusters", n_experts=2)
    return {"run": run, "clusters": root / "clusters"}


def eval_main(env: dict[str, Path], out: Path, *extra: str, run: Path | None = None) -> int:
    return cli.main(["eval", "--run", str(run or env["run"]), "--clusters", str(env["clusters"]), "--out", str(out),
                     "--data", "sklearn:digits:10", *extra])  # fmt: skip


def test_eval_baseline_with_crafted_kwargs_is_one_line_and_runs_nothing(eval_env, good, tmp_path, capsys):
    pay, marker = payload(tmp_path)
    ckpt = crafted(tmp_path / "base.pt", good, model_kwargs={"pretrained_image_path": str(pay), "weights_only": False})
    assert eval_main(eval_env, tmp_path / "out", "--baseline", str(ckpt)) == 2
    assert error_line(capsys, "eval") == (
        f"mode-fast eval: error: checkpoint {ckpt}: model_kwargs key 'pretrained_image_path' is not one "
        "mode-fast writes; refused"
    )
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # refused before --out is touched


def test_eval_baseline_holding_pickled_objects_is_one_line(eval_env, good, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    ckpt = crafted(tmp_path / "base.pt", good, extra=Touch(subprocess.run, marker))
    assert eval_main(eval_env, tmp_path / "out", "--baseline", str(ckpt)) == 2
    assert error_line(capsys, "eval") == (
        f"mode-fast eval: error: checkpoint {ckpt} holds pickled objects of type subprocess.run; "
        "mode-fast loads weights only"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_eval_expert_naming_a_hub_model_is_one_line(eval_env, good, tmp_path, capsys):
    run = tmp_path / "run"
    for k in range(2):
        src = eval_env["run"] / f"expert_{k}" / "checkpoints" / "final.pt"
        (run / f"expert_{k}" / "checkpoints").mkdir(parents=True)
        (run / f"expert_{k}" / "checkpoints" / "final.pt").write_bytes(src.read_bytes())
    bad = crafted(run / "expert_1" / "checkpoints" / "final.pt", good, model_name=f"local-dir:{tmp_path}")
    seed = save_random_model(tmp_path / "seed.pt", 3)
    assert eval_main(eval_env, tmp_path / "out", "--baseline", str(seed), run=run) == 2
    line = error_line(capsys, "eval")
    assert line.startswith(f"mode-fast eval: error: checkpoint {bad}: model_name 'local-dir:{tmp_path}' is not")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- train, end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(pool, a real seed checkpoint with room for experts, its dict)."""
    root = tmp_path_factory.mktemp("trust-train")
    pool = make_shards(root / "shards", n=32, per_shard=16)[0].parent
    assert cli.main(["train", *TRAIN, "--data", str(pool), "--out", str(root / "run"), "--steps", "1",
                     "--schedule-steps", "3"]) == 0  # fmt: skip
    path = root / "run" / "seed" / "checkpoints" / "final.pt"
    return pool, path, torch.load(path, weights_only=True)


def train_main(pool: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", *TRAIN, "--data", str(pool), "--out", str(out), *extra])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"job_step": "0"}, "field 'job_step' is not a step count (got str); refused"),
        ({"rng": [{"torch": torch.zeros(3)}]}, "field 'rng' is not a random state mode-fast writes"),
        ({"optimizer": {"state": {}, "param_groups": []}}, "its optimizer does not fit AdamW"),
    ],
)
def test_train_resume_from_a_crafted_checkpoint_is_one_line(trained, tmp_path, capsys, fields, message):
    pool, _, ckpt = trained
    bad = crafted(tmp_path / "latest.pt", ckpt, **fields)
    assert train_main(pool, tmp_path / "o", "--steps", "1", "--schedule-steps", "3", "--resume", str(bad)) == 2
    assert error_line(capsys, "train").startswith(f"mode-fast train: error: checkpoint {bad}: {message}")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"schedule_step": 1.5}, "field 'schedule_step' is not a step count (got float); refused"),
        ({"model_kwargs": {"weights_only": False}}, "model_kwargs key 'weights_only' is not one mode-fast writes"),
        ({"model_name": "hf-hub:x/y"}, "model_name 'hf-hub:x/y' is not an architecture in open_clip's registry"),
    ],
)
def test_train_expert_from_a_crafted_seed_is_one_line(trained, tmp_path, capsys, fields, message):
    pool, _, ckpt = trained
    bad = crafted(tmp_path / "seed.pt", ckpt, **fields)
    rc = train_main(pool, tmp_path / "o", "--expert", "0", "--clusters", str(tmp_path), "--seed-checkpoint", str(bad))
    assert rc == 2
    assert error_line(capsys, "train").startswith(f"mode-fast train: error: checkpoint {bad}: {message}")


def test_train_seed_holding_pickled_objects_is_one_line(trained, tmp_path, capsys):
    pool, _, ckpt = trained
    marker = tmp_path / "MARKER"
    bad = crafted(tmp_path / "seed.pt", ckpt, extra=Touch(subprocess.run, marker))
    rc = train_main(pool, tmp_path / "o", "--expert", "0", "--clusters", str(tmp_path), "--seed-checkpoint", str(bad))
    assert rc == 2
    assert error_line(capsys, "train") == (
        f"mode-fast train: error: checkpoint {bad} holds pickled objects of type subprocess.run; "
        "mode-fast loads weights only"
    )
    assert not marker.exists()
