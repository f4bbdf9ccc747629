"""`mode-fast export`: a MoDE run's models and ensemble as files other tools load.

From RUN (RUN/seed, RUN/expert_K, each a finished train job with checkpoints/final.pt) and the
cluster folder the experts were trained on, EXPORT gets (layout: `mode_fast.evaluation.mode_ensemble`):

- NAME.safetensors per model (the seed when the run has one, every expert): the checkpoint's
  state_dict as it is, read through the one checkpoint checker
  (`mode_fast.training.checkpoint.load_checkpoint`), which
  ``open_clip.create_model(ARCH, pretrained=FILE)`` loads (its safetensors metadata, one key
  "mode_fast", names ARCH and the kwargs; the same checkpoint always gives the same bytes);
- centers.npz (the cluster folder's, byte for byte) and embedder.json (the spec the clustering
  text encoder is rebuilt from; --embedder as in eval);
- ensemble.json, written last: the models with their architecture, kwargs, file and sha256,
  the experts in order, MoDE's temperature and what its ensemble combines.
`mode_fast.ModeEnsemble.load(EXPORT)` and `mode-fast eval --run EXPORT` read it.

Reruns follow the one lifecycle rule (mode_fast.core.runs): one unit per model, so a killed
export continues; a finished export rerun unchanged is a no-op; a retrained checkpoint, changed
centers or embedder spec, or another --embedder stops, naming it (--overwrite starts over).

`ExportConfig` declares every setting once (mode_fast.core.config); `run_export(cfg)` is the
whole job. Library module: never imports a job module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mode_fast.clustering.folder import CENTERS, EMBEDDER, EMBEDDER_FORMAT, ClusterFolder
from mode_fast.core import files
from mode_fast.core.config import manifest_args, option
from mode_fast.core.errors import InputError, output_error
from mode_fast.core.runs import RunState, fingerprint
from mode_fast.evaluation.ensemble import SOFTMAX_TEMPERATURE
from mode_fast.evaluation.mode_ensemble import ENSEMBLE_FILE, ENSEMBLE_FORMAT, METADATA_KEY, MODEL_SUFFIX
from mode_fast.evaluation.scoring import FINAL, find_experts, finished_train_job, unfinished_reason

log = logging.getLogger("mode_fast.evaluation.export")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What `mode-fast export` does, one field per flag (run.json's "args" are the
    result-changing ones)."""

    run: Path = option(help="train run folder (RUN/seed, RUN/expert_K)", result=False)
    clusters: Path = option(help="`mode-fast cluster` output folder the experts were trained on", result=False)
    out: Path = option(help="export folder", result=False)
    embedder: str | None = option(
        None,
        help="clustering text encoder to record: minilm, hashN or package.module:callable (default: the "
        "one stored with the clusters; a stored package.module:callable is recorded only when named here)",
        result=True,
    )
    overwrite: bool = option(False, help="forget an earlier export in --out and start over", result=False)


@dataclass
class _Plan:
    folder: ClusterFolder
    spec: dict[str, Any]
    embedder_source: str
    models: list[tuple[str, Path]]  # seed first when there is one, then expert_0..


def _plan(cfg: ExportConfig) -> _Plan:
    """What the export reads, checked before --out is touched."""
    from mode_fast.training.checkpoint import check_model_checkpoint

    folder = ClusterFolder(cfg.clusters)
    n = folder.centers().n_experts
    spec, source = folder.resolve_embedder(cfg.embedder or None)
    if cfg.run.is_dir() and not any(d.is_dir() for d in cfg.run.glob("expert_*")):
        raise InputError(
            f"{cfg.run} holds no expert_K folders: export needs a MoDE run "
            "(the experts `mode-fast train --clusters ...` writes)"
        )
    models = [(f"expert_{k}", p) for k, p in enumerate(find_experts(cfg.run, n))]
    seed = cfg.run / "seed"
    if seed.exists():  # a run trained from --seed-checkpoint may have none; one it has must be finished
        if not finished_train_job(seed):
            raise InputError(f"{seed} holds no finished train job ({unfinished_reason(seed)}): finish it or remove it")
        models.insert(0, ("seed", seed / FINAL))
    for _, path in models:  # a crafted or foreign checkpoint is refused before --out is touched
        check_model_checkpoint(path)
    return _Plan(folder, spec, source, models)


def _inputs(plan: _Plan) -> dict[str, Any]:
    inputs = {f"model {name}": fingerprint(path) for name, path in plan.models}
    inputs["centers"] = fingerprint(plan.folder.centers_path)
    if plan.embedder_source == str(plan.folder.root / EMBEDDER):
        inputs["embedder spec"] = fingerprint(plan.folder.root / EMBEDDER)
    return inputs


def run_export(cfg: ExportConfig) -> Path:
    """Write EXPORT (see the module docstring); returns EXPORT/ensemble.json."""
    plan = _plan(cfg)
    out = Path(cfg.out)
    owned = {ENSEMBLE_FILE, CENTERS, EMBEDDER, *(f"{name}{MODEL_SUFFIX}" for name, _ in plan.models)}
    if out.is_dir():  # an earlier export's models that this run has no more of
        owned |= {p.name for p in out.glob(f"*{MODEL_SUFFIX}")}
    with (
        RunState.open(
            out,
            "export",
            inputs=_inputs(plan),
            args=manifest_args(cfg),
            recompute=None,  # any change stops, naming it: an export is cheap to redo with --overwrite
            overwrite=cfg.overwrite,
            owned=sorted(owned),
            log=log.warning,
        ) as state,
        state.interrupts(),
    ):
        if state.finished:
            log.warning("export: %s already holds this export (same inputs and arguments): nothing to do", out)
            return out / ENSEMBLE_FILE
        entries = []
        for i, (name, ckpt) in enumerate(plan.models):
            state.where = f"exporting {name} (model {i + 1}/{len(plan.models)})"
            path = out / f"{name}{MODEL_SUFFIX}"
            if not state.is_done(f"model:{name}"):
                _write_model(ckpt, path, name)
                state.mark_done(f"model:{name}", [path])
            entries.append(_entry(name, ckpt, path))
        state.where = "writing the ensemble file"
        files.write_bytes(out / CENTERS, plan.folder.centers_path.read_bytes())
        files.write_json(out / EMBEDDER, {"format": EMBEDDER_FORMAT, "spec": plan.spec, "name": _spec_name(plan.spec)})
        doc = {
            "format": ENSEMBLE_FORMAT,
            "models": entries,
            "experts": [name for name, _ in plan.models if name != "seed"],
            "n_experts": plan.folder.centers().n_experts,
            "centers": {"file": CENTERS, "sha256": files.sha256_file(out / CENTERS)},
            "embedder": {"file": EMBEDDER, "sha256": files.sha256_file(out / EMBEDDER)},
            "embedder_spec": plan.spec,
            "temperature": SOFTMAX_TEMPERATURE,
            "ensemble_inputs": "cosine",  # MoDE's: the experts' plain cosine similarities
            "source": {"run": str(cfg.run), "clusters": str(plan.folder.centers_path)},
        }
        files.write_json(out / ENSEMBLE_FILE, doc)
        outputs = [out / f"{name}{MODEL_SUFFIX}" for name, _ in plan.models]
        state.finish([*outputs, out / CENTERS, out / EMBEDDER, out / ENSEMBLE_FILE])
    log.info("export: %d models and the ensemble in %s", len(plan.models), out)
    return out / ENSEMBLE_FILE


def _spec_name(spec: dict[str, Any]) -> str:
    if spec["kind"] == "hash":
        return f"hash{spec.get('dim', 64)}"
    return spec.get("factory", spec["kind"])


def _model_info(ckpt: Path) -> tuple[dict[str, Any], str, dict[str, float]]:
    """(checkpoint, architecture, kwargs), through the one checkpoint checker."""
    from mode_fast.training.checkpoint import MODEL_FIELDS, load_checkpoint, model_spec

    data = load_checkpoint(ckpt, MODEL_FIELDS)
    arch, kwargs = model_spec(data, ckpt)
    return data, arch, kwargs


def _write_model(ckpt: Path, path: Path, name: str) -> None:
    """The checkpoint's state_dict as a safetensors file, atomically. Each tensor is copied
    alone (safetensors refuses tensors that share storage, as a loaded state_dict's may)."""
    from safetensors.torch import save_file

    data, arch, kwargs = _model_info(ckpt)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in data["state_dict"].items()}
    # One metadata key: safetensors writes its metadata map in a random order, and two exports of
    # one checkpoint must be the same bytes (the same sha256 in ensemble.json).
    meta = {METADATA_KEY: json.dumps({"architecture": arch, "model_kwargs": kwargs, "model": name}, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.temporary_name(path)
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full or read-only disk: one line naming the file
            raise output_error(path, exc) from exc
        raise
    files.publish(tmp, path)


def _entry(name: str, ckpt: Path, path: Path) -> dict[str, Any]:
    from mode_fast.training.checkpoint import MODEL_FIELDS, load_checkpoint, model_spec

    arch, kwargs = model_spec(load_checkpoint(ckpt, MODEL_FIELDS, mmap=True), ckpt)
    entry: dict[str, Any] = {"name": name, "role": "seed" if name == "seed" else "expert"}
    if name != "seed":
        entry["expert"] = int(name.split("_", 1)[1])
    return entry | {
        "architecture": arch,
        "model_kwargs": kwargs,
        "file": path.name,
        "sha256": files.sha256_file(path),
    }
