"""mode_fast.clustering.folder (the one reader of a cluster folder) and mode_fast.clustering.embedders's specs: the
embedder's spec is stored with the clusters and eval rebuilds the same embedder from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cluster import _write_shards

from mode_fast.clustering.embedders import HashEmbedder, MiniLMEmbedder, embedder_spec, make_embedder
from mode_fast.clustering.experts import TwoLevel
from mode_fast.clustering.folder import EMBEDDER, ClusterFolder, spec_from_legacy_name
from mode_fast.clustering.run import ClusterConfig, run_clustering
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.evaluation import scoring


class LetterEmbedder:
    """A custom embedder: letter counts, L2-normalised; `spec` names its factory."""

    def __init__(self, letters: str = "aeiou") -> None:
        self.letters = letters
        self.dim = len(letters)
        self.name = f"letters-{letters}"

    @property
    def spec(self) -> dict:
        return {"kind": "factory", "factory": f"{__name__}:LetterEmbedder", "kwargs": {"letters": self.letters}}

    def __call__(self, texts):
        out = np.array([[t.count(c) for c in self.letters] for t in texts], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)


class Unnamed(LetterEmbedder):
    spec = None  # cannot be rebuilt from the folder


TEXTS = ["a cat on a mat", "sports car", "tree house by the sea", "pizza"]


@pytest.mark.parametrize("embedder", [HashEmbedder(16), MiniLMEmbedder(), LetterEmbedder("rstln")])
def test_specs_round_trip_through_json(embedder):
    spec = json.loads(json.dumps(embedder_spec(embedder)))
    again = make_embedder(spec)
    assert type(again) is type(embedder) and again.spec == embedder.spec
    if not isinstance(embedder, MiniLMEmbedder):  # MiniLM is compared by type (its model is large)
        assert np.array_equal(again(TEXTS), embedder(TEXTS), equal_nan=True)


def test_command_line_specs():
    assert make_embedder("hash8").spec == {"kind": "hash", "dim": 8}
    assert embedder_spec("minilm") == {"kind": "minilm"}
    assert embedder_spec(f"{__name__}:LetterEmbedder") == {
        "kind": "factory",
        "factory": f"{__name__}:LetterEmbedder",
        "kwargs": {},
    }
    with pytest.raises(ConfigError, match="unknown embedder 'clip'"):
        make_embedder("clip")
    with pytest.raises(ConfigError, match="cannot be imported"):
        make_embedder("no_such_module_here:Thing")


def test_legacy_names_follow_one_rule():
    assert spec_from_legacy_name("all-MiniLM-L6-v2") == {"kind": "minilm"}
    assert spec_from_legacy_name("hash64") == {"kind": "hash", "dim": 64}
    assert spec_from_legacy_name("minilm-ish") is None and spec_from_legacy_name("hash") is None


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clustered")
    _write_shards(root / "shards", [80, 80])
    job = ClusterConfig(shards=sorted((root / "shards").glob("*.tar")), out=root / "out", fine_k=6, experts=2,
                     sample=160, embedder=LetterEmbedder("etaoinsh"), progress=False)  # fmt: skip
    run_clustering(job)
    return root / "out"


def test_custom_embedder_round_trips_through_the_cluster_folder(clustered):
    folder = ClusterFolder(clustered)
    spec, source = folder.embedder_spec()
    assert source == str(clustered / EMBEDDER)
    assert spec == LetterEmbedder("etaoinsh").spec
    # a factory runs only when the user names it (--embedder); then with the stored kwargs
    factory = f"{__name__}:LetterEmbedder"
    rebuilt = folder.embedder(override=factory)
    assert isinstance(rebuilt, LetterEmbedder) and rebuilt.letters == "etaoinsh"
    # eval uses that embedder, not one guessed from a name
    used = scoring.embedder_for(folder, factory, "cpu")
    assert np.array_equal(used(TEXTS), LetterEmbedder("etaoinsh")(TEXTS), equal_nan=True)
    # and the assignments it reads are the ones the job wrote
    sizes = json.loads((clustered / "cluster_sizes.json").read_text())
    expert_of_key = folder.expert_of_key()
    assert len(expert_of_key) == sizes["n_assigned"] > 0
    assert np.bincount(list(expert_of_key.values()), minlength=2).tolist() == sizes["expert_sizes"]


def test_the_same_folder_through_its_centers_file(clustered):
    by_file = ClusterFolder(clustered / "centers.npz")
    assert by_file.root == clustered
    assert by_file.embedder_spec()[0] == ClusterFolder(clustered).embedder_spec()[0]


def test_eval_override_wins(clustered):
    assert isinstance(scoring.embedder_for(ClusterFolder(clustered), "hash8", "cpu"), HashEmbedder)


def old_folder(path: Path, name: str) -> ClusterFolder:
    """A folder as versions before embedder.json wrote it: the name in the centers' config."""
    TwoLevel(np.eye(4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), np.array([0, 0, 1, 1]),
             {"embedder": name}).save(path / "centers.npz")  # fmt: skip
    return ClusterFolder(path)


def test_old_folders_fall_back_by_the_documented_rule(tmp_path):
    hashed = old_folder(tmp_path, "hash16").embedder()
    assert isinstance(hashed, HashEmbedder) and hashed.dim == 16
    (tmp_path / "m").mkdir()
    assert isinstance(old_folder(tmp_path / "m", "all-MiniLM-L6-v2").embedder(), MiniLMEmbedder)
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match=r"embedder name 'my-minilm-variant'.*pass --embedder"):
        old_folder(tmp_path / "x", "my-minilm-variant").embedder()  # no guessing from "minilm"


def test_an_embedder_without_spec_needs_the_flag(tmp_path):
    _write_shards(tmp_path / "shards", [60])
    job = ClusterConfig(shards=[tmp_path / "shards" / "00000.tar"], out=tmp_path / "out", fine_k=4, experts=2,
                     sample=60, embedder=Unnamed("etaoin"), progress=False)  # fmt: skip
    run_clustering(job)
    doc = json.loads((tmp_path / "out" / EMBEDDER).read_text())
    assert doc["spec"] is None and doc["name"] == "letters-etaoin"
    with pytest.raises(InputError, match="pass --embedder"):
        ClusterFolder(tmp_path / "out").embedder()


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=f"cluster folder {tmp_path / 'none'} not found"):
        ClusterFolder(tmp_path / "none").centers()
    (tmp_path / "centers.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=str(tmp_path / "centers.npz")):
        ClusterFolder(tmp_path).centers()
    with pytest.raises(InputError, match="no assignments in"):
        ClusterFolder(tmp_path).expert_of_key()
    (tmp_path / "assignments").mkdir()
    (tmp_path / "assignments" / "x.parquet").write_bytes(b"damaged")
    with pytest.raises(InputError, match=r"x.parquet: not a readable assignment file"):
        ClusterFolder(tmp_path).expert_of_key()
