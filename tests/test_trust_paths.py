"""Paths read from files stay inside their folder (`mode_fast.core.files.inside`): run.json's file
lists, curate's stamps and the sample's info file name files to read, write or delete, and
one that lies outside the job's --out (an absolute path, a `..` escape, a symlink leading
out) stops the job with one line, exit 2, before anything is deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_curate_pipeline import METADATA, make_records
from test_runs import _one_line

from mode_fast import cli
from mode_fast.core.errors import InputError
from mode_fast.core.files import inside
from mode_fast.core.runs import MANIFEST, RunState, code_version, recorded_finished


@pytest.fixture
def outside(tmp_path) -> dict[str, Path]:
    """Files and a folder beside --out (tmp/out) that nothing may delete."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    files = {"x": tmp_path / "x", "abs": tmp_path / "abs.txt", "in_folder": folder / "f"}
    for p in files.values():
        p.write_text("keep me")
    return {**files, "folder": folder}


def _escapes(out: Path, outside: dict[str, Path]) -> dict[str, str]:
    """A name for each way out, and the path run.json would list for it. The symlinks are
    made inside `out`: a folder and a file that lead out of it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "link").symlink_to(outside["folder"], target_is_directory=True)
    (out / "file_link").symlink_to(outside["abs"])
    return {"dotdot": "../x", "absolute": str(outside["abs"]), "folder_link": "link/f", "file_link": "file_link"}


def _still_there(outside: dict[str, Path]) -> None:
    assert all(p.read_text() == "keep me" for name, p in outside.items() if name != "folder")


def _craft(out: Path, job: str, listed: list[str], **extra) -> None:
    """A run.json as `job` writes it, whose units and outputs list `listed`."""
    manifest = {"format": 1, "job": job, "code": code_version(), "inputs": {}, "args": {},
                "units": {"u": listed}, "outputs": listed, "finished": True} | extra  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest))


# --- the helper ---------------------------------------------------------------------------------


def test_inside_joins_paths_inside_and_refuses_every_way_out(tmp_path, outside):
    out = tmp_path / "out"
    escapes = _escapes(out, outside)
    assert inside(out, "data/a.tar", out / MANIFEST) == out / "data" / "a.tar"
    assert inside(out, str(out / "data" / "a.tar"), out / MANIFEST) == out / "data" / "a.tar"  # absolute, inside
    (out / "inner").symlink_to(out / "data", target_is_directory=True)
    assert inside(out, "inner/a.tar", out / MANIFEST) == out / "inner" / "a.tar"  # a link that stays inside
    for bad in [*escapes.values(), "", ".", "data/../..", 5, None, "a\0b"]:
        with pytest.raises(InputError) as err:
            inside(out, bad, out / MANIFEST)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{out / MANIFEST} lists {bad!r}, which lies outside {out}: ")
        assert msg.endswith("rerun with --overwrite to start over, or use another --out")


# --- run.json through RunState ---------------------------------------------------------------------


@pytest.mark.parametrize("way", ["dotdot", "absolute", "folder_link", "file_link"])
def test_run_state_refuses_a_manifest_listing_a_path_outside(tmp_path, outside, way):
    out = tmp_path / "out"
    listed = _escapes(out, outside)[way]
    with RunState.open(out, "job", inputs={}, args={"--k": 1}) as state:
        (out / "mine").write_text("mine")
        state.mark_done("u", [out / "mine"])
        state.finish([out / "mine"])
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["units"]["u"].append(listed)  # the unit a changed --k recomputes
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError) as err:
        RunState.open(out, "job", inputs={}, args={"--k": 2}, recompute={"--k": ["u"]})
    assert str(err.value) == (
        f"{out / MANIFEST} lists {listed!r}, which lies outside {out}: "
        "rerun with --overwrite to start over, or use another --out"
    )
    _still_there(outside)
    assert (out / "mine").read_text() == "mine"  # every path was checked before any was removed
    assert (out / "link").is_symlink() and (out / "file_link").is_symlink()
    assert not recorded_finished(out)
    # the way out: --overwrite forgets run.json without following any path in it
    with RunState.open(out, "job", inputs={}, args={"--k": 2}, overwrite=True, owned=["mine"]) as state:
        assert not state.resumed
    _still_there(outside)


def test_run_state_refuses_outside_outputs_and_damaged_lists(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    _craft(out, "job", [], outputs=["../x"])
    with pytest.raises(InputError, match=r"lists '\.\./x', which lies outside"):
        RunState.open(out, "job", inputs={}, args={})
    for units in ({"u": "a.bin"}, ["a.bin"]):
        _craft(out, "job", [], units=units)
        with pytest.raises(ValueError, match=r"units are not lists of files: rerun with --overwrite"):
            RunState.open(out, "job", inputs={}, args={})
    _still_there(outside)


# --- jobs ---------------------------------------------------------------------------------------------


@pytest.fixture
def curated(tmp_path, metadata_file, make_pool) -> tuple[list[str], Path]:
    """A finished curation of a 2-shard pool: (its command without --out, its --out)."""
    make_pool(tmp_path / "pool", make_records(120), 2)
    args = ["curate", str(tmp_path / "pool"), "--metadata", str(metadata_file(METADATA)), "--t", "10",
            "--workers", "1"]  # fmt: skip
    out = tmp_path / "out"
    assert cli.main([*args, "--out", str(out)]) == 0
    return args, out


def _refused(capsys, argv: list[str], *names: str) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    lines = _one_line(capsys.readouterr().err)
    assert len(lines) == 1 and "lies outside" in lines[0] and all(n in lines[0] for n in names), lines
    return lines[0]


def test_curate_run_json_listing_paths_outside_is_refused(curated, outside, capsys):
    args, out = curated
    before = sorted(p for p in out.rglob("*"))
    for listed in ("../x", str(outside["abs"])):
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["outputs"].append(listed)
        manifest["units"]["u"] = [listed]
        (out / MANIFEST).write_text(json.dumps(manifest))
        _refused(capsys, [*args, "--seed", "3", "--out", str(out)], str(out / MANIFEST), repr(listed))
        _still_there(outside)
        assert sorted(p for p in out.rglob("*")) == before  # nothing curate wrote went either
        manifest["outputs"].remove(listed)
        del manifest["units"]["u"]
        (out / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("way", ["dotdot", "absolute", "file_link"])
def test_curate_stamp_with_a_destination_outside_is_refused(curated, outside, capsys, way):
    args, out = curated
    listed = {"file_link": "data/link.tar"}.get(way) or _escapes(out, outside)[way]
    if way == "file_link":
        (out / "data" / "link.tar").symlink_to(outside["abs"])
    # the stamp of an input no longer in the pool: its curated shard is removed
    stamp = out / ".work" / "sampled" / "gone.tar-0123456789.json"
    stamp.write_text(json.dumps({"t": 10.0, "seed": 0, "dst": listed, "kept": 1}))
    _refused(capsys, [*args, "--seed", "3", "--out", str(out)], str(stamp), repr(listed))
    _still_there(outside)
    assert stamp.exists()
    if way == "file_link":
        assert (out / "data" / "link.tar").is_symlink()


def test_curate_stamp_destinations_inside_are_still_removed(curated, capsys):
    """The rule removes no legitimate cleanup: an older stamp's absolute destination inside
    --out, and a relative one, are the curated shards of inputs no longer in the pool."""
    args, out = curated
    for name, dst in (("a", str(out / "data" / "gone-a.tar")), ("b", "data/gone-b.tar")):
        (out / "data" / f"gone-{name}.tar").write_bytes(b"old")
        (out / ".work" / "sampled" / f"gone-{name}.tar-0123456789.json").write_text(json.dumps({"dst": dst}))
    assert cli.main([*args, "--seed", "3", "--out", str(out)]) == 0
    assert not list((out / "data").glob("gone-*")) and not list((out / ".work" / "sampled").glob("gone-*"))
    stamps = [json.loads(p.read_text())["dst"] for p in (out / ".work" / "sampled").glob("*.json")]
    assert sorted(stamps) == ["data/pool-0000.tar", "data/pool-0001.tar"]  # relative to --out


@pytest.fixture
def shards(tmp_path) -> Path:
    from test_loader import make_shards

    make_shards(tmp_path / "shards", n=16, per_shard=8)
    return tmp_path / "shards"


@pytest.mark.parametrize("way", ["dotdot", "absolute", "folder_link"])
def test_train_run_json_listing_paths_outside_is_refused(tmp_path, outside, shards, capsys, way):
    job = tmp_path / "out" / "seed"
    listed = _escapes(job, outside)[way]
    _craft(job, "train", [listed], finished=False)
    argv = ["train", "--data", str(shards), "--out", str(tmp_path / "out"), "--steps", "1", "--workers", "0"]
    _refused(capsys, argv, str(job / MANIFEST), repr(listed))
    _still_there(outside)
    assert sorted(p.name for p in job.iterdir()) == [".lock", "file_link", "link", MANIFEST]  # nothing written


def test_eval_run_json_listing_paths_outside_is_refused(tmp_path, outside, capsys):
    from test_evaluate import make_centers, save_random_model

    from mode_fast.demo.sample import write_sample

    write_sample(tmp_path / "sample", num_pairs=8, shard_size=8, eval_pairs=8, image_size=16)
    run = tmp_path / "run"
    for k in range(2):
        save_random_model(run / f"expert_{k}" / "checkpoints" / "final.pt", k)
    save_random_model(run / "seed" / "checkpoints" / "final.pt", 9)
    make_centers(tmp_path / "clusters", n_experts=2)
    out = tmp_path / "out"
    listed = _escapes(out, outside)["dotdot"]
    _craft(out, "eval", [listed, str(outside["abs"])], finished=False)
    argv = ["eval", "--run", str(run), "--clusters", str(tmp_path / "clusters"), "--out", str(out),
            "--data", str(tmp_path / "sample")]  # fmt: skip
    _refused(capsys, argv, str(out / MANIFEST), repr(listed))
    _still_there(outside)
    assert not (out / "scores").exists()
    # a symlink in its own scores/ folder, leading out: eval clears it as the link it is
    (out / MANIFEST).unlink()
    (out / "scores").mkdir()
    (out / "scores" / "old").symlink_to(outside["folder"], target_is_directory=True)
    capsys.readouterr()
    assert cli.main([*argv, "--batch-size", "16"]) == 0, capsys.readouterr().err
    _still_there(outside)
    assert not (out / "scores" / "old").exists() and not (out / "scores" / "old").is_symlink()


# --- the demo's sample -----------------------------------------------------------------------------


def test_sample_info_names_are_data(tmp_path, outside):
    """The demo reads the sample's file names and domains from sample_info.json; `sample`
    itself rewrites a sample whose info lists files outside it, touching none of them."""
    from mode_fast.demo.pipeline import write_domain_tasks
    from mode_fast.demo.sample import write_sample

    sample = tmp_path / "sample"
    info = write_sample(sample, num_pairs=8, shard_size=8, eval_pairs=8, image_size=16)
    for key, value in (("templates_file", "../x"), ("eval_shards", [str(outside["abs"])]),
                       ("domains", {"../../x": [0]})):  # fmt: skip
        (sample / "sample_info.json").write_text(json.dumps(info | {key: value}))
        with pytest.raises(InputError, match=r"sample_info.json lists .*, which lies outside"):
            write_domain_tasks(sample, tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()
    (sample / "sample_info.json").write_text(json.dumps(info | {"file_bytes": {"../x": 7}}))
    again = write_sample(sample, num_pairs=8, shard_size=8, eval_pairs=8, image_size=16)
    assert again["file_bytes"] == info["file_bytes"]
    _still_there(outside)
    assert os.path.getsize(outside["x"]) == 7  # "keep me": a size match is no reason to trust it
