"""The `mode-fast cluster` output folder: its layout, its one reader and its writers.

    DIR/centers.npz                  `mode_fast.clustering.experts.TwoLevel`: fine centers, coarse
                                     centers, the expert of each fine center, fit config
    DIR/embedder.json                the caption embedder's spec (`mode_fast.clustering.embedders`), so
                                     eval rebuilds the encoder the captions went through
    DIR/assignments/<shard_id>.parquet   per pair of one shard: key, fine, expert, sqdist;
                                     schema metadata: the shard path and its skip counts
    DIR/shards.json                  shard_id -> shard path
    DIR/embeddings/                  per-shard embedding cache (`mode_fast.clustering.embedders.embed_shard`)
    DIR/cluster_sizes.json, DIR/clusters.png

`ClusterFolder` is the only reader: the cluster job (resume), the training data filter
(`load_expert_assignments` below) and eval all go through it. Problems
raise `InputError` naming the file.

The folder is data (docs: the trust model): the stored spec is checked
(`mode_fast.clustering.embedders.check_spec`), and one that imports code (kind ``factory``) is used only
when the user names the same factory with ``--embedder`` (`ClusterFolder.resolve_embedder`);
the built-in kinds (minilm, hash) rebuild without a flag.

Folders written before embedder.json existed record only the embedder's name in the
centers' config. One rule covers them: the names the built-in embedders had
(``all-MiniLM-L6-v2``, ``hashN``) give those embedders, any other name needs ``--embedder``.

Library module: never imports a job module.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.clustering.embedders import (
    EmbedderSpec,
    check_spec,
    embedder_spec,
    is_factory,
    make_embedder,
    parse_embedder,
    shard_id,
)
from mode_fast.clustering.experts import TwoLevel
from mode_fast.core import files
from mode_fast.core.errors import InputError

log = logging.getLogger(__name__)

CENTERS = "centers.npz"
EMBEDDER = "embedder.json"
ASSIGNMENTS = "assignments"
SHARDS = "shards.json"
SIZES = "cluster_sizes.json"
PLOT = "clusters.png"
EMBEDDINGS = "embeddings"
EMBEDDER_FORMAT = "mode_fast.embedder/1"

# The names built-in embedders recorded before their spec was stored (see the docstring).
_LEGACY_NAMES = {"all-MiniLM-L6-v2": {"kind": "minilm"}}
_LEGACY_HASH = re.compile(r"hash(\d+)")


def spec_from_legacy_name(name: str) -> EmbedderSpec | None:
    if name in _LEGACY_NAMES:
        return dict(_LEGACY_NAMES[name])
    m = _LEGACY_HASH.fullmatch(name)
    return {"kind": "hash", "dim": int(m.group(1))} if m else None


class ClusterFolder:
    """A cluster output folder (or its centers.npz), read lazily; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".npz" and not path.is_dir():
            self.root, self.centers_path = path.parent, path
        else:
            self.root, self.centers_path = path, path / CENTERS
        self._centers: TwoLevel | None = None

    def __repr__(self) -> str:
        return f"ClusterFolder({str(self.root)!r})"

    # -- centers --------------------------------------------------------------------
    def has_centers(self) -> bool:
        return self.centers_path.is_file()

    def centers(self) -> TwoLevel:
        """The fitted two levels; InputError naming the file when missing or unreadable."""
        if self._centers is None:
            if not self.root.is_dir():
                raise InputError(f"cluster folder {self.root} not found (the `mode-fast cluster --out DIR` folder)")
            if not self.centers_path.is_file():
                raise InputError(
                    f"cluster file {self.centers_path} not found (the `mode-fast cluster --out DIR` folder)"
                )
            try:
                self._centers = TwoLevel.load(self.centers_path)
            except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:  # numpy raises several
                raise InputError(f"{self.centers_path}: {e}") from e
        return self._centers

    @property
    def n_experts(self) -> int:
        return self.centers().n_experts

    # -- embedder ---------------------------------------------------------------------
    def embedder_spec(self) -> tuple[EmbedderSpec | None, str]:
        """(spec, where it came from): embedder.json, else the legacy-name rule; the spec is
        None when neither tells (a custom embedder without a spec, or an unknown old name).
        The spec is checked (`check_spec`, InputError naming its source), nothing is built."""
        path = self.root / EMBEDDER
        if path.is_file():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: cannot read the embedder spec ({e})") from e
            if not isinstance(doc, dict) or doc.get("format") != EMBEDDER_FORMAT:
                raise InputError(f"{path}: not an embedder spec (format {EMBEDDER_FORMAT!r})")
            spec, source = doc.get("spec"), str(path)
        else:
            name = str(self.centers().config.get("embedder", ""))
            spec, source = spec_from_legacy_name(name), f"{self.centers_path} (embedder name {name!r}, no {EMBEDDER})"
        return (None if spec is None else check_spec(spec, source, InputError)), source

    def resolve_embedder(self, override: str | None = None) -> tuple[EmbedderSpec, str]:
        """(the spec to embed with, where it came from). `override` is the user's --embedder:
        it wins, except that naming the stored factory takes the stored spec (its kwargs
        are the clustering's). Without it, the stored spec, unless that imports code: a
        factory runs only when the user names it."""
        if override is not None:
            wanted = parse_embedder(override)
            if is_factory(wanted):
                stored, source = self.embedder_spec()
                if is_factory(stored) and stored["factory"] == wanted["factory"]:
                    return stored, source
            return wanted, f"--embedder {override}"
        spec, source = self.embedder_spec()
        if spec is None:
            raise InputError(f"cannot tell the clustering encoder from {source}: pass --embedder")
        if is_factory(spec):
            factory = spec["factory"]
            raise InputError(
                f"{source} names the embedder factory {factory!r}, which would run code from the cluster "
                f"folder: pass --embedder {factory} to use it"
            )
        return spec, source

    def embedder(self, device: str = "cpu", batch_size: int = 256, override: str | None = None) -> Any:
        """The clustering's caption embedder, rebuilt from the spec `resolve_embedder` picks."""
        return make_embedder(self.resolve_embedder(override)[0], device=device, batch_size=batch_size)

    # -- assignments ------------------------------------------------------------------
    def assignment_path(self, shard: str | Path) -> Path:
        return self.root / ASSIGNMENTS / f"{shard_id(shard)}.parquet"

    def assignment_files(self) -> list[Path]:
        files_ = sorted((self.root / ASSIGNMENTS).glob("*.parquet"))
        if not files_:
            raise InputError(
                f"no assignments in {self.root}/{ASSIGNMENTS}/*.parquet: run `mode-fast cluster --out "
                f"{self.root} ...` first"
            )
        return files_

    def iter_assignments(
        self, paths: Sequence[Path] | None = None, columns: Sequence[str] = ("key", "expert")
    ) -> Iterator[tuple[Path, Any, dict[str, int]]]:
        """(file, pyarrow table of `columns`, skip counts) per assignment file."""
        import pyarrow.parquet as pq

        for path in self.assignment_files() if paths is None else paths:
            try:
                pf = pq.ParquetFile(path)
                table = pf.read(columns=list(columns))
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise InputError(f"{path}: not a readable assignment file ({e})") from e
            meta = pf.schema_arrow.metadata or {}
            skipped = {k: int(v) for k, v in json.loads(meta.get(b"mode_fast.skipped", b"{}")).items()}
            yield Path(path), table, skipped

    def expert_of_key(self) -> dict[str, int]:
        """Every assigned pair's expert; a key in several shards keeps its first expert."""
        expert_of_key: dict[str, int] = {}
        conflicts = 0
        for _, table, _ in self.iter_assignments():
            for key, expert in zip(table.column("key").to_pylist(), table.column("expert").to_pylist()):
                if expert_of_key.setdefault(key, int(expert)) != int(expert):
                    conflicts += 1
        if conflicts:
            log.warning("%d keys appear in several shards with different experts; the first is used", conflicts)
        return expert_of_key


# -- writers ------------------------------------------------------------------------------
def write_embedder_spec(root: str | Path, embedder: Any, name: str) -> EmbedderSpec | None:
    """DIR/embedder.json for `embedder` (a spec string or an object) named `name`; an
    object without a `.spec` is recorded by name only, and eval then needs --embedder."""
    spec = embedder_spec(embedder)
    if spec is None:
        log.warning("cluster: embedder %s has no .spec: eval will need --embedder to rebuild it", name)
    doc = {"format": EMBEDDER_FORMAT, "spec": spec, "name": name}
    files.write_text(Path(root) / EMBEDDER, json.dumps(doc, indent=1) + "\n")
    return spec


def write_assignment_table(
    path: str | Path,
    keys: np.ndarray,
    fine: np.ndarray,
    expert: np.ndarray,
    sqdist: np.ndarray,
    shard: str | Path,
    skipped: dict[str, int],
) -> None:
    """One shard's assignments, atomically (an existing file marks the shard done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array(keys.tolist(), pa.string()),
            "fine": pa.array(fine.astype(np.int32)),
            "expert": pa.array(expert.astype(np.int32)),
            "sqdist": pa.array(sqdist.astype(np.float32)),
        }
    ).replace_schema_metadata({"mode_fast.shard": str(shard), "mode_fast.skipped": json.dumps(skipped)})
    files.write_with(Path(path), lambda f: pq.write_table(table, f))


def plot_clusters(model: TwoLevel, fine_sizes: np.ndarray, path: str | Path) -> None:
    """DIR/clusters.png: 2-D PCA of the fine centers coloured by expert (area ~ cluster size), the
    fine-cluster size histogram, and the expert sizes. Agg canvas: no display needed and
    no global matplotlib backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = model.fine_centroids.astype(np.float64)
    c = c - c.mean(0)
    # top-2 principal directions by SVD (K x D is small)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    xy = c @ vt[:2].T if vt.shape[0] >= 2 else np.c_[c @ vt[:1].T, np.zeros(len(c))]
    experts = model.expert_of_fine
    fig = Figure(figsize=(15, 4.8))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 0.7]})
    area = 8 + 120 * fine_sizes / max(1, fine_sizes.max())
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    base = colormaps["tab10" if model.n_experts <= 10 else "tab20"]
    n_colors = len(base.colors)  # type: ignore[attr-defined]
    cmap = ListedColormap([base.colors[e % n_colors] for e in range(model.n_experts)])  # type: ignore[attr-defined]
    sc = ax1.scatter(xy[:, 0], xy[:, 1], c=experts, s=area, cmap=cmap, alpha=0.75,
                     vmin=-0.5, vmax=model.n_experts - 0.5)  # fmt: skip
    fig.colorbar(sc, ax=ax1, ticks=range(model.n_experts), label="expert")
    ax1.set_title(f"{len(c)} fine centers, PCA (area ~ size)")
    ax1.set_xlabel("PC 1")
    ax1.set_ylabel("PC 2")
    ax2.hist(fine_sizes, bins=min(50, max(5, len(fine_sizes) // 4)), color="0.35")
    ax2.set_title("fine cluster sizes")
    ax2.set_xlabel("pairs per fine cluster")
    ax2.set_ylabel("fine clusters")
    esz = np.bincount(experts, weights=fine_sizes, minlength=model.n_experts)
    colors = [sc.cmap(sc.norm(e)) for e in range(model.n_experts)]
    ax3.bar(range(model.n_experts), esz, color=colors)
    ax3.set_xticks(range(model.n_experts))
    ax3.set_title("pairs per expert")
    ax3.set_xlabel("expert")
    fig.tight_layout()
    files.write_with(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))


@dataclass
class ExpertAssignments:
    """Per-pair expert ids from a `mode-fast cluster` folder."""

    expert_of_key: dict[str, int]
    n_experts: int | None  # from centers.npz; None when that file is absent


def load_expert_assignments(cluster_dir: str | Path) -> ExpertAssignments:
    """Per-pair experts of a `mode-fast cluster` folder, read by its one reader
    (`mode_fast.clustering.folder.ClusterFolder`); the expert count from centers.npz when present."""
    folder = ClusterFolder(cluster_dir)
    expert_of_key = folder.expert_of_key()
    return ExpertAssignments(expert_of_key, folder.n_experts if folder.has_centers() else None)
