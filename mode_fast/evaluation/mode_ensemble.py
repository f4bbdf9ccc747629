"""An exported MoDE ensemble (`mode-fast export`'s folder) and `ModeEnsemble`, its library use.

    EXPORT/ensemble.json        format "mode_fast.ensemble/1": the models (name, role, open_clip
                                architecture, constructor kwargs, file, sha256), the experts in
                                order, the centers and embedder files (with their sha256), the
                                embedder spec, MoDE's softmax temperature and what the
                                ensemble combines
    EXPORT/NAME.safetensors     one model's state_dict (seed, expert_0, ...), loadable with
                                ``open_clip.create_model(ARCH, pretrained=FILE, **model_kwargs)``
    EXPORT/centers.npz          the cluster folder's centers (`mode_fast.clustering.experts.TwoLevel`):
                                the fine centers and the expert of each fine center
    EXPORT/embedder.json        the clustering text encoder's spec (`mode_fast.clustering.folder`)

so EXPORT is also a cluster folder `mode_fast.clustering.folder.ClusterFolder` reads, and
`mode-fast eval --run EXPORT` evaluates it without --clusters.

The folder is data (docs/trust.md): JSON is parsed, the arrays load with allow_pickle=False,
the weights are safetensors (no pickle at all), an architecture must be in open_clip's registry
and the kwargs ones mode-fast writes (the checkpoint checker's rule,
`mode_fast.training.checkpoint`), every file the JSON names lies inside EXPORT
(`mode_fast.core.files.inside`) and must have the recorded sha256; a factory embedder runs only
when the caller names it. Problems raise `InputError`, one line naming the file.

`ModeEnsemble.load(EXPORT).zero_shot(images, class_names, templates)` scores images with each
expert and combines them with MoDE's task-adaptive weights through the functions `mode-fast
eval` uses (`mode_fast.evaluation.scoring.task_scores`, `.ensemble.combine_logits`, the
`Ensembler`), so its numbers are eval's for the same images, templates and batch size.
Library module: never imports a job module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.clustering.folder import CENTERS, EMBEDDER, ClusterFolder
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.core.files import inside, sha256_file
from mode_fast.evaluation.ensemble import ENSEMBLE_INPUTS, SOFTMAX_TEMPERATURE, check_class_names, combine_logits
from mode_fast.evaluation.scoring import Ensembler, LoadedModel, ensemble_inputs, logit_scale, task_scores
from mode_fast.evaluation.tasks import ClassificationTask, check_templates

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "mode_fast.ensemble/1"
MODEL_SUFFIX = ".safetensors"
METADATA_KEY = "mode_fast"  # a model file's safetensors metadata: JSON of architecture, model_kwargs, model
_NAME = re.compile(r"seed|expert_(0|[1-9][0-9]*)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_export(folder: str | Path) -> bool:
    """Whether `folder` holds an export (its ensemble.json), as eval's --run detects it."""
    return (Path(folder) / ENSEMBLE_FILE).is_file()


@dataclass(frozen=True)
class ExportedModel:
    """One model of an export, as ensemble.json lists it (checked)."""

    name: str  # "seed" or "expert_K"
    architecture: str  # an open_clip registry name
    model_kwargs: dict[str, float]  # open_clip.create_model's extra arguments (SigLIP's init)
    path: Path  # EXPORT/NAME.safetensors
    sha256: str


class ExportFolder:
    """An export folder's ensemble.json, read and checked (see the module docstring); the
    models are loaded on demand (`load_model`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.file = self.root / ENSEMBLE_FILE
        if not self.root.is_dir():
            raise InputError(f"export folder {self.root} not found (the `mode-fast export --out EXPORT` folder)")
        if not self.file.is_file():
            raise InputError(
                f"{self.root} holds no {ENSEMBLE_FILE}: not a `mode-fast export` folder (or its export did not finish)"
            )
        try:
            doc = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{self.file} cannot be read ({e}): export the run again") from e
        if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT:
            raise InputError(f"{self.file} is not a mode-fast ensemble file (format {ENSEMBLE_FORMAT!r})")
        self.doc = doc
        models = doc.get("models")
        if not isinstance(models, list) or not models:
            raise InputError(f"{self.file}: 'models' is not a non-empty list")
        self.models = {m.name: m for m in (self._model(i, entry) for i, entry in enumerate(models))}
        if len(self.models) != len(models):
            raise InputError(f"{self.file}: a model name appears twice")
        self.expert_names = [f"expert_{k}" for k in range(sum(n.startswith("expert_") for n in self.models))]
        if not self.expert_names or any(n not in self.models for n in self.expert_names):
            raise InputError(f"{self.file}: the experts must be expert_0..expert_(n-1), got {sorted(self.models)}")
        temperature = doc.get("temperature")
        if temperature != SOFTMAX_TEMPERATURE:  # expert_weights has one temperature: another file's would be ignored
            raise InputError(
                f"{self.file}: temperature {temperature!r} is not MoDE's {SOFTMAX_TEMPERATURE} that this mode-fast computes"
            )
        self.ensemble_inputs = doc.get("ensemble_inputs", "cosine")
        if self.ensemble_inputs not in ENSEMBLE_INPUTS:
            raise InputError(f"{self.file}: ensemble_inputs {self.ensemble_inputs!r} is not one of {ENSEMBLE_INPUTS}")
        self.centers_path = self._file(doc.get("centers"), "centers", CENTERS, ".npz")
        self._file(doc.get("embedder"), "embedder", EMBEDDER, ".json")
        self.clusters = ClusterFolder(self.centers_path)
        if self.clusters.centers().n_experts != len(self.expert_names):
            raise InputError(
                f"{self.centers_path} has {self.clusters.centers().n_experts} experts, "
                f"{self.file} lists {len(self.expert_names)}"
            )

    @property
    def seed(self) -> ExportedModel | None:
        return self.models.get("seed")

    def _file(self, entry: Any, what: str, name: str, suffix: str) -> Path:
        """The centers or embedder file: named as export writes it, inside, with its sha256."""
        if not isinstance(entry, dict) or entry.get("file") != name:
            raise InputError(f"{self.file}: {what} must be {{'file': {name!r}, 'sha256': ...}}")
        path = inside(self.root, entry["file"], self.file, "export the run again")
        self._check_sha(path, entry.get("sha256"))
        return path

    def _check_sha(self, path: Path, sha: Any) -> None:
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise InputError(f"{self.file}: the sha256 of {path.name} is not a hex digest")
        if not path.is_file():
            raise InputError(f"{path} not found (listed in {self.file})")
        if sha256_file(path) != sha:
            raise InputError(
                f"{path} does not have the sha256 {self.file} records: the export was changed; export again"
            )

    def _model(self, i: int, entry: Any) -> ExportedModel:
        from mode_fast.training.checkpoint import model_spec

        if not isinstance(entry, dict):
            raise InputError(f"{self.file}: model {i} is not an object")
        name, file, sha = entry.get("name"), entry.get("file"), entry.get("sha256")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(f"{self.file}: model {i} has name {name!r}, not 'seed' or 'expert_K'")
        if not isinstance(file, str) or not file.endswith(MODEL_SUFFIX):
            raise InputError(f"{self.file}: model {name} has file {file!r}, not a {MODEL_SUFFIX} file")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise InputError(f"{self.file}: model {name} has no sha256 hex digest")
        # the checkpoint checker's rule for the architecture and kwargs (registry names only)
        spec = {"model_name": entry.get("architecture"), "model_kwargs": entry.get("model_kwargs", {})}
        arch, kwargs = model_spec(spec, self.file)
        return ExportedModel(name, arch, kwargs, inside(self.root, file, self.file, "export the run again"), sha)

    def model_at(self, path: str | Path) -> ExportedModel | None:
        """The model whose file is `path` (eval's plan names models by path), or None."""
        return next((m for m in self.models.values() if m.path == Path(path)), None)

    def load_model(self, name: str, device: str = "cpu") -> LoadedModel:
        """Model `name` as eval loads a checkpoint (`mode_fast.training.checkpoint.load_model`:
        architecture and kwargs only, no weights of open_clip's own, eval mode, open_clip's
        eval transform, the bounded tokenizer) with its weights from its safetensors file,
        whose sha256 is checked first."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from mode_fast.training.checkpoint import build_model, load_state
        from mode_fast.training.models import get_tokenizer

        m = self.models[name]
        self._check_sha(m.path, m.sha256)
        try:
            state = load_file(m.path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{m.path} is not a readable safetensors file ({e}): export the run again") from e
        model, preprocess = build_model(m.architecture, m.model_kwargs)  # the one constructor call
        load_state(model, {"state_dict": state, "model_name": m.architecture}, "state_dict", m.path)
        return LoadedModel(name, m.path, model.to(device).eval(), preprocess, get_tokenizer(m.architecture))


@dataclass
class ZeroShot:
    """`ModeEnsemble.zero_shot`'s answer: the ensemble's logits [N, C] (float64, MoDE's
    weighted sum of the experts' cosines or scaled cosines), their argmax, the weights and each
    expert's cosine similarities [N, C] (float32, as eval stores them)."""

    logits: np.ndarray
    predictions: np.ndarray
    weights: np.ndarray
    expert_logits: dict[str, np.ndarray]


class ModeEnsemble:
    """A MoDE ensemble loaded from an export folder (see the module docstring):
    ``ModeEnsemble.load("export").zero_shot(pil_images, ["cat", "dog"], ["a photo of a {}."])``
    gives the predictions and weights; ``.experts`` are the experts' open_clip models,
    ``.loaded(name)`` one model with its transform and tokenizer."""

    def __init__(self, export: ExportFolder, device: str = "cpu", embedder: str | None = None) -> None:
        self.export = export
        self.device = device
        self._embedder_override = embedder
        self._loaded: dict[str, LoadedModel] = {}
        self._ensembler: Ensembler | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", embedder: str | None = None) -> ModeEnsemble:
        """Read EXPORT/ensemble.json (checked; the models load on first use). `embedder`:
        the clustering text encoder spec to use instead of the stored one, or, naming a stored
        factory, the permission to run it (as eval's --embedder)."""
        ens = cls(ExportFolder(path), device, embedder)
        ens.export.clusters.resolve_embedder(embedder)  # a factory not named here is refused now
        return ens

    @property
    def expert_names(self) -> list[str]:
        return list(self.export.expert_names)

    def loaded(self, name: str) -> LoadedModel:
        """Model `name` ("seed", "expert_K") with its transform and tokenizer, loaded once."""
        if name not in self.export.models:
            raise KeyError(f"{self.export.file} has no model {name!r}: it has {sorted(self.export.models)}")
        if name not in self._loaded:
            self._loaded[name] = self.export.load_model(name, self.device)
        return self._loaded[name]

    def expert(self, k: int) -> Any:
        """Expert k's open_clip model (eval mode)."""
        return self.loaded(f"expert_{k}").model

    @property
    def experts(self) -> list[Any]:
        """The experts' open_clip models, in order."""
        return [self.loaded(n).model for n in self.expert_names]

    @property
    def seed(self) -> Any | None:
        """The seed model the experts started from, when the export has it."""
        return self.loaded("seed").model if self.export.seed else None

    def ensembler(self) -> Ensembler:
        if self._ensembler is None:
            folder = self.export.clusters
            self._ensembler = Ensembler(
                folder.centers(), folder.embedder(device=self.device, override=self._embedder_override)
            )
        return self._ensembler

    def weights(self, class_names: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """MoDE's expert weights [n_experts] (float64, sum 1) for a task's class names through
        its templates (eval's `Ensembler.weights`)."""
        classes = _classes(class_names)
        return self.ensembler().weights(classes, _templates(templates) if templates is not None else None)[0]

    def zero_shot(
        self,
        images: Sequence[Any],
        class_names: Sequence[str],
        templates: Sequence[str],
        batch_size: int = 256,
        inputs: str | None = None,
    ) -> ZeroShot:
        """Zero-shot classification of `images` (PIL images) into `class_names`, each class
        embedded through `templates` ("{}" = the name): every expert's cosine similarities
        (eval's `task_scores`, one pass, `batch_size` images at a time: eval's --batch-size
        gives eval's exact floats), combined with `weights(class_names, templates)`.
        `inputs`: "cosine" (MoDE's) or "scaled" (each expert's cosines times its logit
        scale); default the export's."""
        classes, temps = _classes(class_names), _templates(templates)
        inputs = inputs or self.export.ensemble_inputs
        if inputs not in ENSEMBLE_INPUTS:
            raise ConfigError(f"inputs must be one of {', '.join(ENSEMBLE_INPUTS)}, got {inputs!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        pictures = list(images)
        task = ClassificationTask(
            name="zero_shot",
            source="the images given",
            classes=classes,
            templates=temps,
            items=lambda: ((lambda im=im: im, -1) for im in pictures),
        )
        experts = [self.loaded(n) for n in self.expert_names]
        w = self.weights(classes, temps)
        cosines, _ = task_scores(task, experts, self.device, batch_size, max_bad_share=0.0)
        combined = ensemble_inputs(
            [logit_scale(m) for m in experts], [np.asarray(c, dtype=np.float64) for c in cosines], inputs
        )
        logits = combine_logits(combined, w)
        return ZeroShot(logits, logits.argmax(1), w, dict(zip(self.expert_names, cosines)))


def _classes(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise ConfigError("class_names must be a list of names, not one string")
    try:
        return check_class_names(class_names)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"class_names: {e}") from e


def _templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str):
        raise ConfigError("templates must be a list of strings with '{}', not one string")
    try:
        return check_templates(templates, "templates")
    except InputError as e:
        raise ConfigError(str(e)) from e
