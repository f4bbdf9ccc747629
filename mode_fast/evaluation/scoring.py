"""Zero-shot scoring: the models, their image and text features, the ensembles and the metrics.

`task_scores` is the expensive part: one pass over a task's images gives every model's
cosine similarities (image x class for classification, image x caption for retrieval),
float32 as the models compute them. `classification_summary` / `retrieval_summary` turn
stored scores into results: top-1/top-5 and mean per-class recall (CLIP_benchmark's third
classification metric) or recall@1/5/10 both ways, for each model, the
best expert (an oracle pick), the plain mean of the experts and MoDE's weighted ensemble
(mode_fast.evaluation.ensemble; Ma et al., "MoDE: CLIP Data Experts via Clustering", CVPR
2024, arXiv:2404.16030). Both ensembles combine plain cosine similarities, as MoDE's public
code does; "scaled" multiplies each expert's by its own logit scale first. Library module:
never imports a job module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.core.runs import MANIFEST, recorded_finished
from mode_fast.data.images import DEFAULT_MAX_BAD_SHARE
from mode_fast.evaluation.ensemble import ENSEMBLE_INPUTS, combine_logits, expert_weights, template_class_embeddings
from mode_fast.evaluation.results import RECALL_KS
from mode_fast.evaluation.tasks import ClassificationTask, EvalError, RetrievalTask

log = logging.getLogger(__name__)

ENSEMBLES = ("best_expert", "mean_ensemble", "mode_ensemble")
FINAL = "checkpoints/final.pt"  # a train job's final checkpoint, relative to its folder


@dataclass
class LoadedModel:
    name: str
    checkpoint: Path
    model: Any
    preprocess: Any
    tokenizer: Any


def finished_train_job(folder: Path) -> bool:
    """Whether a train job folder (RUN/seed, RUN/expert_K) holds a finished job: its run.json
    (mode_fast.core.runs) records a finished train run with checkpoints/final.pt among its
    outputs. A folder without run.json (checkpoints put together by hand, or by a mode-fast
    that wrote none) counts by its checkpoints/final.pt; a folder a job only started (a
    .lock, a killed or refused run) does not count."""
    if (folder / MANIFEST).exists():
        return recorded_finished(folder, job="train", output=FINAL)
    return (folder / FINAL).is_file()


def unfinished_reason(folder: Path) -> str:
    if (folder / MANIFEST).exists():
        return f"its {MANIFEST} records no finished train run with {FINAL}"
    return f"it holds no {MANIFEST} and no {FINAL}"


def find_experts(run_dir: Path, n_experts: int) -> list[Path]:
    """RUN/expert_K/checkpoints/final.pt for K < n_experts. A run is judged by its finished
    jobs (`finished_train_job`), not by the folders it holds: an unfinished expert folder is
    skipped with a warning naming it; errors name what is missing or extra."""
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} not found")
    folders = {
        int(d.name.split("_", 1)[1]): d
        for d in run_dir.glob("expert_*")
        if d.is_dir() and d.name.split("_", 1)[1].isdigit()
    }
    finished = sorted(k for k, d in folders.items() if finished_train_job(d))
    for k in sorted(set(folders) - set(finished)):
        log.warning("eval: skipping %s, not a finished train job: %s", folders[k], unfinished_reason(folders[k]))
    extra = [k for k in finished if k >= n_experts]
    if extra:
        raise EvalError(
            f"{run_dir} has finished experts {finished} but the cluster file has {n_experts} experts "
            f"(0..{n_experts - 1}): expert_{extra[0]} does not match it"
        )
    paths = [run_dir / f"expert_{k}" / FINAL for k in range(n_experts)]
    missing = [str(p) for k, p in enumerate(paths) if k not in finished]
    if missing:
        raise EvalError(
            f"the cluster file has {n_experts} experts but {len(missing)} expert checkpoint(s) are "
            f"missing or unfinished: {', '.join(missing)}"
        )
    return paths


def load_models(named: Sequence[tuple[str, Path]], device: str) -> list[LoadedModel]:
    from mode_fast.training.checkpoint import load_model

    out = []
    for name, ckpt in named:
        if not Path(ckpt).is_file():
            raise EvalError(f"{name}: checkpoint {ckpt} not found")
        model, preprocess, tokenizer = load_model(ckpt, device)
        out.append(LoadedModel(name, Path(ckpt), model, preprocess, tokenizer))
    return out


def _encode_texts(m: LoadedModel, texts: Sequence[str], device: str, batch: int) -> Any:
    import torch

    parts = []
    for s in range(0, len(texts), batch):
        tokens = m.tokenizer(list(texts[s : s + batch])).to(device)
        parts.append(m.model.encode_text(tokens, normalize=True).float())
    return torch.cat(parts)


def zero_shot_classifier(
    m: LoadedModel, classes: Sequence[str], templates: Sequence[str], device: str, batch: int = 256
) -> Any:
    """[C, D]: per class the normalised mean of its normalised prompt embeddings (CLIP's recipe)."""
    import torch

    texts = [t.format(c) for c in classes for t in templates]
    emb = _encode_texts(m, texts, device, batch).view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def _image_features(
    models: Sequence[LoadedModel], loaders: Iterator[Callable[[], Any]], device: str, batch: int
) -> list[Any]:
    """One pass over the images: every model's normalised features [N, D] (each with its transform)."""
    import torch

    feats: list[list[Any]] = [[] for _ in models]
    buf: list[Any] = []

    def flush() -> None:
        for i, m in enumerate(models):
            x = torch.stack([m.preprocess(im) for im in buf]).to(device)
            feats[i].append(m.model.encode_image(x, normalize=True).float())
        buf.clear()

    for load in loaders:
        buf.append(load())
        if len(buf) == batch:
            flush()
    if buf:
        flush()
    return [torch.cat(f) if f else torch.zeros(0) for f in feats]


# --------------------------------------------------------------------------- metrics
def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(1).mean())


def mean_per_class_recall(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present in `labels` of the share of their images whose
    top-1 (first argmax) is right: scikit-learn's balanced_accuracy_score of (labels,
    argmax), which CLIP_benchmark reports as mean_per_class_recall. numpy only: eval does
    not import scikit-learn."""
    y = np.asarray(labels)
    hit = np.asarray(logits).argmax(1) == y
    present, inverse = np.unique(y, return_inverse=True)
    per_class = np.bincount(inverse, weights=hit, minlength=len(present)) / np.bincount(inverse)
    return float(per_class.mean())


def recall_at_k_positives(sim: np.ndarray, positive: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """sim[i, j] = score of query i for item j; positive[i, j] says item j is right for
    query i (each query has at least one). A query is a hit at k when its best-scored right
    item ranks under k, the rank being how many items score strictly higher (ties count for
    the query, as recall_at_k): CLIP_benchmark's recall@k, "at least one true positive in
    the top k". With one right item per query (the identity) it is recall_at_k."""
    best = np.where(positive, sim, -np.inf).max(1)
    rank = (sim > best[:, None]).sum(1)
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def flatten_captions(targets: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """A retrieval task's targets (a caption per image, or a list of captions per image) as
    (all captions in image order, the image index of each)."""
    captions: list[str] = []
    image: list[int] = []
    for i, t in enumerate(targets):
        group = [t] if isinstance(t, str) else list(t)
        captions += group
        image += [i] * len(group)
    return captions, np.asarray(image, dtype=np.int64)


def recall_at_k(sim: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """sim[i, j] = score of query i for item j; the right item of query i is i.
    Rank of the right item = how many items score strictly higher (ties count for the query)."""
    right = np.diag(sim)[:, None]
    rank = (sim > right).sum(1)
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


@dataclass
class Ensembler:
    """Weights of the experts for a list of texts (class names or captions)."""

    centers: Any  # TwoLevel
    embedder: Any

    @property
    def n_experts(self) -> int:
        return self.centers.n_experts

    def weights(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(weights [n], texts per expert [n]); with templates, each text is embedded through
        them and the embeddings averaged, then normalised (MoDE's class embeddings, mode.md)."""
        temps = list(templates or ["{}"])
        raw = np.asarray(self.embedder([t.format(x) for x in texts for t in temps]), dtype=np.float64)
        finite = np.isfinite(raw).reshape(len(texts), -1).all(1)
        if not finite.all():
            bad = [x for x, ok in zip(texts, finite) if not ok]
            raise EvalError(f"the clustering encoder gives no embedding for {bad[:3]!r}")
        try:
            emb = template_class_embeddings(lambda _: raw, texts, templates)
        except ValueError as e:
            raise EvalError(f"ensemble weights: {e}") from e
        w = expert_weights(emb, self.centers.fine_centroids, self.centers.expert_of_fine, self.n_experts)
        _, groups, _ = self.centers.assign(emb.astype(np.float32))
        return w, np.bincount(groups, minlength=self.n_experts)


def embedder_for(folder: Any, override: str | None, device: str) -> Any:
    """The clustering's caption encoder, rebuilt from the spec stored with the clusters
    (`mode_fast.clustering.folder.ClusterFolder.resolve_embedder`); an override spec (eval
    --embedder) replaces it, or, naming the stored factory, allows it."""
    return folder.embedder(device=device, override=override or None)


def ensemble_inputs(scales: Sequence[float], cosines: Sequence[np.ndarray], inputs: str) -> list[np.ndarray]:
    """What the ensembles combine: the plain cosines (MoDE) or each times its model's logit
    scale (`scales`, exp of the stored log scale)."""
    if inputs == "cosine":
        return list(cosines)
    if inputs == "scaled":
        return [float(s) * c for s, c in zip(scales, cosines)]
    raise EvalError(f"ensemble inputs {inputs!r}: known are {', '.join(ENSEMBLE_INPUTS)}")


def logit_scale(m: LoadedModel) -> float:
    return float(m.model.logit_scale.detach().exp())


def task_scores(
    task: ClassificationTask | RetrievalTask,
    models: Sequence[LoadedModel],
    device: str,
    batch: int = 256,
    max_bad_share: float = DEFAULT_MAX_BAD_SHARE,
) -> tuple[list[np.ndarray], list[Any]]:
    """One pass over the task's images: per model the cosine similarities (float32, [N, C]
    with the classes or [N, N] with the captions), and the labels or captions in image
    order (for a task with several captions per image, [N, all captions] and the lists;
    `flatten_captions`). A model's scores do not depend on which other models share the pass. Images
    skipped as bad (undecodable, over the pixel limit) are left out; more than
    `max_bad_share` of the task's images stops it (InputError, one line)."""
    import torch

    targets: list[Any] = []

    def loaders() -> Iterator[Callable[[], Any]]:
        for load, target in task.items():
            targets.append(target)
            yield load

    with torch.no_grad():
        feats = _image_features(models, loaders(), device, batch)
        task.bad.check(len(targets) + len(task.bad), max_bad_share, f"images of task {task.name}")
        if not targets:
            if task.kind == "classification":
                raise EvalError(f"task {task.name}: no images in {task.source}")
            raise EvalError(f"retrieval task {task.name}: no captioned images in {task.source}")
        scores = []
        for m, f in zip(models, feats):
            if task.kind == "classification":
                text = zero_shot_classifier(m, task.classes, task.templates, device, batch)
            else:
                text = _encode_texts(m, flatten_captions(targets)[0], device, batch)
            scores.append((f @ text.T).cpu().numpy().astype(np.float32, copy=False))
    return scores, targets


def _with_ensembles(
    scores: dict[str, np.ndarray], experts: Sequence[str], weights: np.ndarray, scales: dict[str, float], inputs: str
) -> dict[str, np.ndarray]:
    """The models' scores (float64) plus the mean and MoDE ensembles of the experts'."""
    scored = {name: np.asarray(s, dtype=np.float64) for name, s in scores.items()}
    n = len(experts)
    combined = ensemble_inputs([scales[e] for e in experts], [scored[e] for e in experts], inputs)
    scored["mean_ensemble"] = combine_logits(combined, np.full(n, 1.0 / n))
    scored["mode_ensemble"] = combine_logits(combined, weights)
    return scored


def classification_summary(
    task: ClassificationTask,
    scores: dict[str, np.ndarray],
    labels: np.ndarray,
    experts: Sequence[str],
    weights: tuple[np.ndarray, np.ndarray],
    scales: dict[str, float],
    inputs: str = "cosine",
) -> dict[str, Any]:
    """results.json's entry for a classification task from every model's scores (models in
    `scores` order, experts named in `experts`), the MoDE weights and texts per expert."""
    y = np.asarray(labels)
    scored = _with_ensembles(scores, experts, weights[0], scales, inputs)
    top1 = {k: topk_accuracy(v, y, 1) for k, v in scored.items()}
    top5 = {k: topk_accuracy(v, y, 5) for k, v in scored.items()}
    recall = {k: mean_per_class_recall(v, y) for k, v in scored.items()}
    best = max(experts, key=lambda e: top1[e])
    for d in (top1, top5, recall):
        d["best_expert"] = d[best]
    return {
        "kind": "classification",
        "source": task.source,
        "n_images": int(len(y)),
        "n_classes": len(task.classes),
        "n_templates": len(task.templates),
        "expert_weights": weights[0].tolist(),
        "classes_per_expert": weights[1].tolist(),
        "best_expert": best,
        "top1": top1,
        "top5": top5,
        "mean_per_class_recall": recall,
        "correct": {k: (v.argmax(1) == y).astype(int).tolist() for k, v in scored.items()},
        "labels": y.tolist(),
    }


def retrieval_summary(
    task: RetrievalTask,
    scores: dict[str, np.ndarray],
    experts: Sequence[str],
    weights: tuple[np.ndarray, np.ndarray],
    scales: dict[str, float],
    inputs: str = "cosine",
    caption_image: np.ndarray | None = None,
) -> dict[str, Any]:
    """results.json's entry for a retrieval task (see classification_summary); MoDE's
    weights come from the captions, the query texts. `caption_image` (the image of each
    caption, `flatten_captions`) is for tasks with several captions per image: image->text
    is a hit when any of the image's captions ranks under k, text->image is per caption."""
    scored = _with_ensembles(scores, experts, weights[0], scales, inputs)
    n_images, n_captions = next(iter(scored.values())).shape
    one_each = caption_image is None or np.array_equal(caption_image, np.arange(n_images))
    positive = None if one_each else np.arange(n_images)[:, None] == np.asarray(caption_image)[None, :]
    recall = {}
    for k, s in scored.items():
        if positive is None:  # pair i is (image i, caption i): as before several captions per image
            i2t, t2i = recall_at_k(s), recall_at_k(s.T)
        else:
            i2t, t2i = recall_at_k_positives(s, positive), recall_at_k_positives(s.T, positive.T)
        r = {f"image_to_text_{m}": v for m, v in i2t.items()} | {f"text_to_image_{m}": v for m, v in t2i.items()}
        r["mean_recall"] = float(np.mean(list(r.values())))
        recall[k] = r
    best = max(experts, key=lambda e: recall[e]["mean_recall"])
    recall["best_expert"] = recall[best]
    return {
        "kind": "retrieval",
        "source": task.source,
        "n_pairs": int(n_images),
        **({} if one_each else {"n_captions": int(n_captions)}),
        "expert_weights": weights[0].tolist(),
        "captions_per_expert": weights[1].tolist(),
        "best_expert": best,
        "recall": recall,
    }
