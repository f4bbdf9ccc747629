"""MoDE's two-level clustering (Ma et al., "MoDE: CLIP Data Experts via Clustering", CVPR
2024, arXiv:2404.16030; its public code: facebookresearch/MetaCLIP, mode/prep_hrchy.py):
fine centers fitted on a sample of caption embeddings, coarse groups (the data experts) by
clustering the fine centers; a pair's expert is the coarse group of its nearest fine center.

Library module: `TwoLevel` (the fitted centers, saved as one .npz) and `fit_two_level`,
over `mode_fast.clustering.kmeans`. The cluster job's output folder is read and written by
`mode_fast.clustering.folder`. Never imports a job module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mode_fast.clustering.kmeans import KMeans, _as_tensor
from mode_fast.core import files
from mode_fast.kernels.kmeans_assign import kmeans_assign

TWO_LEVEL_FORMAT = "mode_fast.two_level/1"
# A row whose norm is within this of 1 counts as normalised and is used bit for bit, so the
# cluster job (which embeds normalised captions) gets the same centers as before.
UNIT_TOLERANCE = 1e-4


def unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x with every row L2-normalised (MoDE clusters unit vectors, mode/prep_hrchy.py); rows
    already of unit norm are kept as they are; a zero or non-finite row is an error naming
    its index."""
    norms = torch.linalg.vector_norm(x, dim=1)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{name}: row {i} has norm {float(norms[i])}: it cannot be normalised")
    off = (norms - 1).abs() > UNIT_TOLERANCE
    if not bool(off.any()):
        return x
    return torch.where(off[:, None], x / norms[:, None], x)


@dataclass
class TwoLevel:
    """Fine centers [K_fine, D] and, for each, its coarse group (expert) id.

    Saved as one .npz (format "mode_fast.two_level/1"): fine_centroids float32 [K_fine, D],
    coarse_centroids float32 [n_experts, D], expert_of_fine int64 [K_fine], config JSON.
    """

    fine_centroids: np.ndarray
    coarse_centroids: np.ndarray
    expert_of_fine: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_experts(self) -> int:
        return int(self.coarse_centroids.shape[0])

    def assign(self, x: Any, backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fine ids, expert ids, sqdist to the fine center), numpy, greedy nearest fine center.

        Rows are L2-normalised first, as MoDE's public code does before both levels
        (facebookresearch/MetaCLIP, mode/prep_hrchy.py); unit rows are left as they are."""
        xt = unit_rows(_as_tensor(x, "TwoLevel.assign x"), "TwoLevel.assign x")
        c = torch.from_numpy(self.fine_centroids).to(xt.device)
        fine, sqdist = kmeans_assign(xt, c, backend=backend)
        fine_np = fine.cpu().numpy()
        return fine_np, self.expert_of_fine[fine_np], sqdist.cpu().numpy()

    def save(self, path: str | Path) -> None:
        files.save_npz(
            Path(path),
            format=np.array(TWO_LEVEL_FORMAT),
            fine_centroids=self.fine_centroids.astype(np.float32),
            coarse_centroids=self.coarse_centroids.astype(np.float32),
            expert_of_fine=self.expert_of_fine.astype(np.int64),
            config=np.array(json.dumps(self.config)),
        )

    @classmethod
    def load(cls, path: str | Path) -> TwoLevel:
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["format"]) if "format" in z else None
            if fmt != TWO_LEVEL_FORMAT:
                raise ValueError(f"{path}: not a two-level centers file (format {fmt!r}, want {TWO_LEVEL_FORMAT!r})")
            return cls(
                fine_centroids=z["fine_centroids"],
                coarse_centroids=z["coarse_centroids"],
                expert_of_fine=z["expert_of_fine"],
                config=json.loads(str(z["config"])),
            )


def fit_two_level(
    sample: Any,
    fine_k: int = 1024,
    n_experts: int = 4,
    seed: int = 1234,
    niter: int = 25,
    balanced: bool = True,
    spherical: bool = False,
    verbose: bool = False,
    max_points_per_centroid: int = 256,
    balanced_coarse: bool = True,
) -> tuple[TwoLevel, KMeans, KMeans]:
    """MoDE's two levels on a sample of caption embeddings, as MoDE's public code
    (facebookresearch/MetaCLIP, mode/prep_hrchy.py); rows are L2-normalised first (unit rows
    are used as they are).

    Fine: KMeans(fine_k), balanced by default as in the paper (the bound applies to the
    fitted sample; the pool is then assigned greedily to the nearest fine center).
    Coarse: KMeans(n_experts) on the fine centers themselves (unweighted), k-means++,
    balanced by default as MoDE's coarse step (balanced_coarse=False: plain k-means); each
    fine center then goes to its nearest fitted coarse center (the bound holds during the fit;
    this last nearest-center step can move a few fine centers, as in MoDE).
    """
    x = unit_rows(_as_tensor(sample, "fit_two_level sample"), "fit_two_level sample")
    if x.shape[0] < fine_k:
        raise ValueError(
            f"fit_two_level: fine k={fine_k} is larger than the sample ({x.shape[0]} embeddings); "
            "use a larger --sample or a smaller --fine-k"
        )
    if n_experts > fine_k:
        raise ValueError(f"fit_two_level: {n_experts} experts > {fine_k} fine centers")
    fine = KMeans(
        fine_k, niter=niter, seed=seed, balanced=balanced, spherical=spherical, verbose=verbose,
        max_points_per_centroid=max_points_per_centroid,
    ).fit(x)  # fmt: skip
    coarse = KMeans(
        n_experts, niter=max(niter, 50), seed=seed, spherical=spherical, verbose=verbose, balanced=balanced_coarse
    )
    coarse.fit(fine.centroids)
    # MoDE's coarse step predicts each fine center's group with the fitted centers (nearest).
    expert_of_fine = np.asarray(coarse.assign(fine.centroids)[0], dtype=np.int64)
    model = TwoLevel(
        fine_centroids=fine.centroids,
        coarse_centroids=coarse.centroids,
        expert_of_fine=expert_of_fine,
        config={
            "fine_k": fine_k, "n_experts": n_experts, "seed": seed, "niter": niter,
            "balanced": balanced, "balanced_coarse": balanced_coarse, "spherical": spherical,
            "sample_size": int(x.shape[0]),
        },
    )  # fmt: skip
    return model, fine, coarse
