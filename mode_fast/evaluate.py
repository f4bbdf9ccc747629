"""`mode-fast eval`: zero-shot scores of MoDE data experts, their ensembles and single models.

For each task the experts (RUN/expert_K/checkpoints/final.pt, K < the cluster file's expert
count) and the single models (the seed RUN/seed/checkpoints/final.pt, or --baseline CKPT,
repeatable) are scored, and from the experts' logits:

- best_expert: the expert with the highest score on this task (an oracle pick);
- mean_ensemble: the plain mean of the experts' cosine similarities;
- mode_ensemble: MoDE's weighted sum of them, weights from the task's class names embedded
  with the clustering text encoder through the task's templates (averaged, then normalised)
  against the fine centers (mode_fast.ensemble, ../shared/reference/mode.md).
Both ensembles combine plain cosine similarities, as MoDE's public code does;
`--ensemble-inputs scaled` multiplies each expert's by its own logit scale first. results.json
records which (`ensemble_inputs`) and the tables say it. Single models and experts are
ranked by cosine (a positive scale does not change a ranking).

Tasks (--data, each SPEC optionally NAME=SPEC):
- webdataset shards (a .tar, a glob, or a folder of .tar): images in .jpg/.jpeg/.png/.webp,
  label in .cls (an integer) or a field of .json (--label-field, an index or a class name);
  class names from --classes or classes.json beside the shards;
- a folder with one sub-folder of images per class (the sub-folder names are the classes);
- a CSV of path,label (paths relative to the CSV; labels are indices or class names);
- the embedded sample's eval split (DIR/eval, or the sample DIR itself);
- `sklearn:digits`: scikit-learn's bundled UCI handwritten digits (1797 8x8 images, no
  download; needs scikit-learn), drawn as dark ink on white paper at 32x32 like the sample's
  glyphs, classes "digit zero".."digit nine"; `sklearn:digits:N` takes a class-balanced
  deterministic subset of N images.
Class names: --classes FILE (a JSON list), or --classes imagenet (open_clip's 1000 ImageNet
names, index = the usual sorted-wnid label), else classes.json beside the data. Prompt
templates (each with one "{}"): --templates FILE, or --templates openai-imagenet (open_clip's
80 OPENAI_IMAGENET_TEMPLATES) or simple-imagenet (its 7 SIMPLE_IMAGENET_TEMPLATES), else
templates.json beside the data, else the task's own (digits) or SIMPLE_IMAGENET_TEMPLATES. --retrieval SHARDS... adds image-text retrieval
(recall@1/5/10 both ways) on captioned shards; the ensemble's weights come from the captions.

Outputs in --out, each written atomically: results.json, results.md, accuracy.png,
expert_weights.png (and retrieval.png with --retrieval). results.json keeps, per
classification task, each method's per-image correctness (`correct`, 1/0 in image order) and
the `labels`, so differences between methods can be given paired standard errors.

Job module: the task readers, the scoring, the frozen `EvalConfig`, and calls into the
library: checkpoints (`mode_fast.checkpoint.load_model`), the cluster folder with its
centers and stored embedder spec (`mode_fast.clusters`), MoDE's weights
(`mode_fast.ensemble`) and the result files (`mode_fast.results`). It imports no other job.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.data.io import ReadReport, ShardError, TarGroup, describe_fields, iter_samples
from mode_fast.ensemble import (
    ENSEMBLE_INPUTS,
    check_class_names,
    combine_logits,
    expert_weights,
    template_class_embeddings,
)
from mode_fast.errors import ConfigError, InputError
from mode_fast.results import RECALL_KS, markdown_table, method_order, write_outputs

log = logging.getLogger("mode_fast.evaluate")

RESULTS_FORMAT = "mode_fast.eval/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class EvalError(InputError):
    """Bad input to the evaluation: the message names the file or value at fault."""


# --------------------------------------------------------------------------- tasks
@dataclass
class ClassificationTask:
    """Labelled images: `items()` yields (loader of a PIL image, label) in a fixed order."""

    name: str
    source: str
    classes: list[str]
    templates: list[str]
    items: Callable[[], Iterator[tuple[Callable[[], Any], int]]]
    kind: str = "classification"
    reads: ReadReport = field(default_factory=ReadReport)  # shard tasks: skips counted by items()


@dataclass
class RetrievalTask:
    """Captioned images: pair i is (image i, caption i)."""

    name: str
    source: str
    items: Callable[[], Iterator[tuple[Callable[[], Any], str]]]
    kind: str = "retrieval"
    reads: ReadReport = field(default_factory=ReadReport)


def check_templates(templates: Sequence[str], source: str) -> list[str]:
    out = list(templates)
    if not out:
        raise EvalError(f"{source}: the template list is empty")
    for i, t in enumerate(out):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise EvalError(f"{source}: template {i} ({t!r}) must be a string with exactly one '{{}}'")
    return out


def default_templates() -> list[str]:
    return named_templates("simple-imagenet")


# --------------------------------------------------------------------------- built-in names
# open_clip's list repeats two names (OpenAI's prompt-engineering list does): 657 and 744 are
# both "missile", 836 and 837 both "sunglasses". Class lists must be unique here (labels may
# be class names, mode_fast.ensemble.check_class_names), so the second of each pair takes
# the first WordNet lemma of its synset: 744 n04008634 "projectile, missile" -> "projectile",
# 836 n04355933 "sunglass" -> "sunglass". The other 998 names are open_clip's as shipped.
IMAGENET_RENAMES = {744: "projectile", 836: "sunglass"}
CLASS_SETS = ("imagenet",)
TEMPLATE_SETS = ("openai-imagenet", "simple-imagenet")


def named_classes(name: str) -> list[str]:
    """A built-in class list by name (--classes imagenet)."""
    if name == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
        for i, new in IMAGENET_RENAMES.items():
            names[i] = new
        return names
    raise EvalError(f"unknown class list {name!r}: known names are {', '.join(CLASS_SETS)}")


def named_templates(name: str) -> list[str]:
    """A built-in template list by name (--templates openai-imagenet / simple-imagenet)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    lists = {"openai-imagenet": OPENAI_IMAGENET_TEMPLATES, "simple-imagenet": SIMPLE_IMAGENET_TEMPLATES}
    if name not in lists:
        raise EvalError(f"unknown template list {name!r}: known names are {', '.join(TEMPLATE_SETS)}")
    return [t("{}") for t in lists[name]]  # open_clip keeps them as lambdas


def _option_list(
    value: Path | str | None, option: str, shortcuts: Sequence[str], load_named: Callable[[str], list[str]]
) -> tuple[list[Any], str] | None:
    """--classes / --templates: a shortcut name (given exactly, e.g. `imagenet`) or a JSON-list
    file; (the list, where it came from) or None when the option is not given. A file whose
    name is a shortcut is still reachable as ./NAME."""
    if value is None:
        return None
    if isinstance(value, str) and value in shortcuts:
        return load_named(value), f"{option} {value}"
    path = Path(value)
    if not path.is_file():
        raise EvalError(f"{option} {value}: no such file, and not a built-in name ({', '.join(shortcuts)})")
    return _read_json_list(path, option.lstrip("-")), str(path)


def option_classes(value: Path | str | None) -> tuple[list[str], str] | None:
    got = _option_list(value, "--classes", CLASS_SETS, named_classes)
    return None if got is None else (_checked_classes(got[0], got[1]), got[1])


def option_templates(value: Path | str | None) -> tuple[list[str], str] | None:
    got = _option_list(value, "--templates", TEMPLATE_SETS, named_templates)
    return None if got is None else (check_templates(got[0], got[1]), got[1])


def _read_json_list(path: Path, what: str) -> list[Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"{what} file {path}: cannot read a JSON list ({e})") from e
    if not isinstance(value, list):
        raise EvalError(f"{what} file {path}: expected a JSON list, got {type(value).__name__}")
    return value


def _checked_classes(names: Sequence[Any], source: str) -> list[str]:
    try:
        return check_class_names(names)
    except (ValueError, TypeError) as e:
        raise EvalError(f"{source}: bad class list: {e}") from e


def _find_beside(base: Path, name: str) -> Path | None:
    """`name` in the data's folder (or its parent, for a folder of shards)."""
    folder = base if base.is_dir() else base.parent
    for d in (folder, folder.parent):
        if (d / name).is_file():
            return d / name
    return None


def _pil_from_bytes(data: bytes, where: str) -> Callable[[], Any]:
    def load() -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise EvalError(f"{where}: not a readable image ({e})") from e

    return load


def _pil_from_path(path: Path) -> Callable[[], Any]:
    def load() -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise EvalError(f"{path}: not a readable image ({e})") from e

    return load


def _list_tars(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        found = sorted(p.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        found = sorted(Path(x) for x in glob.glob(spec))
    else:
        found = [p] if p.is_file() else []
    if not found:
        raise EvalError(f"no webdataset shards found at {spec}")
    return found


def _iter_tar(shards: Sequence[Path], report: ReadReport) -> Iterator[tuple[TarGroup, Path]]:
    """(sample, shard) per undamaged sample, through the walk every job shares
    (mode_fast.data.io: one key rule, resync past damage, skips counted in `report`)."""
    for shard in shards:
        try:
            yield from ((group, shard) for group in iter_samples(shard, report, read_data=False))
        except ShardError as e:
            raise EvalError(str(e)) from e


def _image_member(group: TarGroup) -> bytes | None:
    ext = next((e for e in IMAGE_EXTS if e in group.exts), None)
    return None if ext is None else group.read(ext)


def _label_index(value: Any, classes: list[str], where: str) -> int:
    """An integer label (or its digits) is an index; any other string is a class name."""
    if isinstance(value, bool):
        raise EvalError(f"{where}: label {value!r} is not an index or a class name")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if not 0 <= value < len(classes):
            raise EvalError(f"{where}: label {value} is outside the {len(classes)} classes (0..{len(classes) - 1})")
        return value
    if isinstance(value, str):
        try:
            return classes.index(value)
        except ValueError:
            raise EvalError(f"{where}: label {value!r} is not one of the class names") from None
    raise EvalError(f"{where}: label {value!r} is not an index or a class name")


def _resolve_meta(
    base: Path,
    classes_file: Path | str | None,
    templates_file: Path | str | None,
    fallback_classes: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Class names and templates: the option (a file or a built-in name), else the JSON file
    beside the data, else the fallback (class names) or open_clip's simple templates."""
    given = option_classes(classes_file)
    cpath = None if given else _find_beside(base, "classes.json")
    if given is not None:
        classes = given[0]
    elif cpath is not None:
        classes = _checked_classes(_read_json_list(cpath, "classes"), str(cpath))
    elif fallback_classes is not None:
        classes = _checked_classes(fallback_classes, str(base))
    else:
        raise EvalError(
            f"{base}: no class names: put classes.json beside the data or pass --classes FILE "
            f"(or --classes {'/'.join(CLASS_SETS)})"
        )
    given_t = option_templates(templates_file)
    tpath = None if given_t else _find_beside(base, "templates.json")
    if given_t is not None:
        templates = given_t[0]
    elif tpath is not None:
        templates = check_templates(_read_json_list(tpath, "templates"), str(tpath))
    else:
        templates = default_templates()
    return classes, templates


# --------------------------------------------------------------------------- sklearn:digits
SKLEARN_PREFIX = "sklearn:"
SKLEARN_DATASETS = ("digits",)
# The embedded sample's glyph domain names its digit classes "digit one" and "digit seven"
# (mode_fast.data.sample.DOMAINS; captions also say "number 1", "numeral one"), so the ten
# digits are "digit zero".."digit nine": the same words a model trained on the sample has
# seen, and plain English for any CLIP.
DIGIT_CLASSES = [f"digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
# The sample's generic prompts ("a photo of a {}.", "a drawing of a {}.") plus ones in the
# style of its glyph captions ("the {obj} in {fg} on {bg}", "{obj} in {fg} ink").
DIGIT_TEMPLATES = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a handwritten {}.",
    "the {} in black on white.",
    "{} in black ink.",
]
DIGIT_IMAGE_SIZE = 32  # 8x8 upsampled 4x (nearest): the sample's image size


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """n indices, deterministic and class-balanced: round-robin over the classes, each class's
    items in their order; returned in the data's order."""
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [idx[r] for r in range(max(len(x) for x in per_class)) for idx in per_class if r < len(idx)]
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def digit_image(pixels: np.ndarray, size: int = DIGIT_IMAGE_SIZE) -> Any:
    """One sklearn digit (8x8, ink 0..16) as a PIL RGB image: dark ink on white paper, like
    the sample's glyphs (0 -> 255 paper, 16 -> 0 ink), upsampled with nearest to size x size."""
    from PIL import Image

    gray = np.clip(np.rint(255.0 - np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def load_sklearn_task(
    name: str, rest: str, classes_file: Path | str | None = None, templates_file: Path | str | None = None
) -> ClassificationTask:
    """`sklearn:digits[:N]` (see the module docstring)."""
    spec = SKLEARN_PREFIX + rest
    dataset, _, count = rest.partition(":")
    if dataset not in SKLEARN_DATASETS:
        raise EvalError(
            f"--data {spec}: unknown scikit-learn dataset {dataset!r} "
            f"(known: {', '.join(SKLEARN_PREFIX + d for d in SKLEARN_DATASETS)})"
        )
    limit = None
    if count:
        if not count.isdigit() or int(count) < 1:
            raise EvalError(
                f"--data {spec}: the image count after '{SKLEARN_PREFIX}{dataset}:' must be a positive integer"
            )
        limit = int(count)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise EvalError(
            f"--data {spec} needs scikit-learn, which is not installed ({e}): pip install scikit-learn"
        ) from e
    bunch = load_digits()
    images, labels = np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    if limit is not None:
        if limit > len(labels):
            raise EvalError(f"--data {spec}: asks for {limit} images but {dataset} has {len(labels)}")
        keep = balanced_subset(labels, limit)
        images, labels = images[keep], labels[keep]
    given = option_classes(classes_file)
    classes = given[0] if given else list(DIGIT_CLASSES)
    if len(classes) != len(DIGIT_CLASSES):
        raise EvalError(
            f"--data {spec}: {given[1] if given else 'classes'} has {len(classes)} class names "
            f"but {dataset} has {len(DIGIT_CLASSES)} classes (0..9)"
        )
    given_t = option_templates(templates_file)
    templates = given_t[0] if given_t else list(DIGIT_TEMPLATES)

    def items_digits() -> Iterator[tuple[Callable[[], Any], int]]:
        for px, y in zip(images, labels):
            yield (lambda px=px: digit_image(px)), int(y)

    return ClassificationTask(name or dataset, spec, classes, templates, items_digits)


def load_task(
    spec: str,
    classes_file: Path | str | None = None,
    templates_file: Path | str | None = None,
    label_field: str = "label",
) -> ClassificationTask:
    """A classification task from one --data SPEC (see the module docstring)."""
    name, _, path_text = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    if path_text.startswith(SKLEARN_PREFIX):
        return load_sklearn_task(name, path_text[len(SKLEARN_PREFIX) :], classes_file, templates_file)
    path = Path(path_text)
    # The sample's root folder: use its eval split.
    if path.is_dir() and (path / "eval").is_dir() and not list(path.glob("*.tar")):
        path = path / "eval"
    name = name or (path.parent.name + "/" + path.name if path.name == "eval" else path.stem or path.name)

    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise EvalError(f"CSV {path} not found")
        rows = _read_csv(path)
        labels = [lab for _, lab in rows]
        fallback = None if all(lab.strip().isdigit() for lab in labels) else sorted(set(labels))
        classes, templates = _resolve_meta(path, classes_file, templates_file, fallback)
        resolved = [
            (path.parent / p, _label_index(lab, classes, f"{path} row {i + 1}")) for i, (p, lab) in enumerate(rows)
        ]
        for p, _ in resolved:
            if not p.is_file():
                raise EvalError(f"{path}: image {p} not found")

        def items_csv() -> Iterator[tuple[Callable[[], Any], int]]:
            for p, y in resolved:
                yield _pil_from_path(p), y

        return ClassificationTask(name, str(path), classes, templates, items_csv)

    if path.is_dir() and not list(path.glob("*.tar")):
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subdirs:
            raise EvalError(f"{path}: neither .tar shards nor one sub-folder per class")
        folder_names = [d.name for d in subdirs]
        classes, templates = _resolve_meta(
            path, classes_file, templates_file, [n.replace("_", " ") for n in folder_names]
        )
        if len(classes) != len(subdirs):
            raise EvalError(f"{path}: {len(subdirs)} class folders but {len(classes)} class names")
        files = [
            (f, y)
            for y, d in enumerate(subdirs)
            for f in sorted(d.rglob("*"))
            if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS
        ]
        if not files:
            raise EvalError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) in the class folders")

        def items_folder() -> Iterator[tuple[Callable[[], Any], int]]:
            for f, y in files:
                yield _pil_from_path(f), y

        return ClassificationTask(name, str(path), classes, templates, items_folder)

    shards = _list_tars(str(path))
    classes, templates = _resolve_meta(shards[0].parent if not path.is_dir() else path, classes_file, templates_file)
    report = ReadReport()

    def items_tar() -> Iterator[tuple[Callable[[], Any], int]]:
        report.clear()
        for group, shard in _iter_tar(shards, report):
            where = f"{shard} sample {group.key}"
            image = _image_member(group)
            if image is None:
                raise EvalError(
                    f"{where}: no image member ({', '.join('.' + e for e in IMAGE_EXTS)}); "
                    f"it has {describe_fields(group.sample())}"
                )
            if "cls" in group.exts:
                label: Any = group.read("cls").decode("utf-8", "replace").strip()
            elif "json" in group.exts:
                try:
                    meta = json.loads(group.read("json"))
                except ValueError as e:
                    raise EvalError(f"{where}: bad .json ({e})") from e
                if not isinstance(meta, dict) or label_field not in meta:
                    raise EvalError(
                        f"{where}: no .cls member and no {label_field!r} field in .json "
                        f"(--label-field); it has {describe_fields(group.sample())}"
                    )
                label = meta[label_field]
            else:
                raise EvalError(
                    f"{where}: no label (.cls member or .json field {label_field!r}); "
                    f"it has {describe_fields(group.sample())}"
                )
            report.read += 1
            yield _pil_from_bytes(image, where), _label_index(label, classes, where)

    return ClassificationTask(name, str(path), classes, templates, items_tar, reads=report)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]  # header
    if not rows:
        raise EvalError(f"CSV {path} has no rows (expected path,label)")
    for i, r in enumerate(rows):
        if len(r) < 2 or not r[0].strip():
            raise EvalError(f"CSV {path} row {i + 1}: expected path,label, got {r!r}")
    return [(r[0].strip(), r[1].strip()) for r in rows]


def _retrieval_caption(group: TarGroup, caption_key: str) -> Any:
    """Caption from .txt, else the .json field `caption_key`; None when there is none."""
    if "txt" in group.exts:
        return group.read("txt").decode("utf-8", "replace")
    if "json" in group.exts:
        try:
            meta = json.loads(group.read("json"))
        except ValueError:
            return None
        return meta.get(caption_key) if isinstance(meta, dict) else None
    return None


def _check_retrieval_key(shards: Sequence[Path], caption_key: str) -> None:
    """A wrong --caption-key is one error naming the key and the fields the first sample
    has, up front, rather than every pair skipped after the models have loaded."""
    samples = _iter_tar(shards[:1], ReadReport())
    with contextlib.closing(samples):
        first = next(samples, None)
        if first is None:
            return  # the task's own check reports an empty task
        group, shard = first
        if _image_member(group) is not None and _retrieval_caption(group, caption_key) is None:
            raise EvalError(
                f"--caption-key {caption_key!r}: the first sample {group.key!r} of {shard} has no "
                f".txt and no .json field {caption_key!r}; it has {describe_fields(group.sample())}"
            )


def load_retrieval_task(spec: str, caption_key: str = "caption") -> RetrievalTask:
    """Captioned webdataset shards: caption from .txt, else the .json field `caption_key`."""
    name, _, path_text = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    shards = _list_tars(path_text)
    _check_retrieval_key(shards, caption_key)
    report = ReadReport()

    def items() -> Iterator[tuple[Callable[[], Any], str]]:
        report.clear()
        for group, shard in _iter_tar(shards, report):
            where = f"{shard} sample {group.key}"
            image = _image_member(group)
            caption = _retrieval_caption(group, caption_key)
            if image is None or not isinstance(caption, str) or not caption.strip():
                log.warning("%s: skipped (no image or no caption)", where)
                report.skip(shard, "no image or caption")
                continue
            report.read += 1
            yield _pil_from_bytes(image, where), caption

    return RetrievalTask(name or Path(path_text).stem or "retrieval", path_text, items, reads=report)


# --------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    name: str
    checkpoint: Path
    model: Any
    preprocess: Any
    tokenizer: Any


def find_experts(run_dir: Path, n_experts: int) -> list[Path]:
    """RUN/expert_K/checkpoints/final.pt for K < n_experts; errors name what is missing or extra."""
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} not found")
    present = sorted(
        int(d.name.split("_", 1)[1])
        for d in run_dir.glob("expert_*")
        if d.is_dir() and d.name.split("_", 1)[1].isdigit()
    )
    extra = [k for k in present if k >= n_experts]
    if extra:
        raise EvalError(
            f"{run_dir} has expert folders {present} but the cluster file has {n_experts} experts "
            f"(0..{n_experts - 1}): expert_{extra[0]} does not match it"
        )
    paths = [run_dir / f"expert_{k}" / "checkpoints" / "final.pt" for k in range(n_experts)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvalError(
            f"the cluster file has {n_experts} experts but {len(missing)} expert checkpoint(s) are "
            f"missing: {', '.join(missing)}"
        )
    return paths


def load_models(named: Sequence[tuple[str, Path]], device: str) -> list[LoadedModel]:
    from mode_fast.checkpoint import load_model

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


def _embedder_for(folder: Any, override: str | None, device: str) -> Any:
    """The clustering's caption encoder, rebuilt from the spec stored with the clusters
    (mode_fast.clusters); --embedder replaces it."""
    from mode_fast.embed import make_embedder

    if override:
        return make_embedder(override, device=device)
    return folder.embedder(device=device)


def _ensemble_inputs(models: Sequence[LoadedModel], cosines: list[np.ndarray], inputs: str) -> list[np.ndarray]:
    """What the ensembles combine: the plain cosines (MoDE) or each times its model's logit scale."""
    if inputs == "cosine":
        return cosines
    if inputs == "scaled":
        return [float(m.model.logit_scale.detach().exp()) * c for m, c in zip(models, cosines)]
    raise EvalError(f"ensemble inputs {inputs!r}: known are {', '.join(ENSEMBLE_INPUTS)}")


def evaluate_classification(
    task: ClassificationTask,
    experts: Sequence[LoadedModel],
    singles: Sequence[LoadedModel],
    ens: Ensembler,
    device: str,
    batch: int = 256,
    ensemble_inputs: str = "cosine",
) -> dict[str, Any]:
    import torch

    labels: list[int] = []

    def loaders() -> Iterator[Callable[[], Any]]:
        for load, y in task.items():
            labels.append(y)
            yield load

    models = list(experts) + list(singles)
    with torch.no_grad():
        feats = _image_features(models, loaders(), device, batch)
        if not labels:
            raise EvalError(f"task {task.name}: no images in {task.source}")
        logits = []
        for m, f in zip(models, feats):
            cls = zero_shot_classifier(m, task.classes, task.templates, device, batch)
            logits.append((f @ cls.T).cpu().numpy().astype(np.float64))  # cosine similarities
    y = np.asarray(labels)
    weights, groups = ens.weights(task.classes, task.templates)
    n = len(experts)
    scored: dict[str, np.ndarray] = {m.name: lg for m, lg in zip(models, logits)}
    inputs = _ensemble_inputs(experts, logits[:n], ensemble_inputs)
    scored["mean_ensemble"] = combine_logits(inputs, np.full(n, 1.0 / n))
    scored["mode_ensemble"] = combine_logits(inputs, weights)
    top1 = {k: topk_accuracy(v, y, 1) for k, v in scored.items()}
    top5 = {k: topk_accuracy(v, y, 5) for k, v in scored.items()}
    best = max(range(n), key=lambda k: top1[experts[k].name])
    for d in (top1, top5):
        d["best_expert"] = d[experts[best].name]
    return {
        "kind": "classification",
        "source": task.source,
        "n_images": int(len(y)),
        "n_classes": len(task.classes),
        "n_templates": len(task.templates),
        "expert_weights": weights.tolist(),
        "classes_per_expert": groups.tolist(),
        "best_expert": experts[best].name,
        "top1": top1,
        "top5": top5,
        "correct": {k: (v.argmax(1) == y).astype(int).tolist() for k, v in scored.items()},
        "labels": y.tolist(),
    }


def evaluate_retrieval(
    task: RetrievalTask,
    experts: Sequence[LoadedModel],
    singles: Sequence[LoadedModel],
    ens: Ensembler,
    device: str,
    batch: int = 256,
    ensemble_inputs: str = "cosine",
) -> dict[str, Any]:
    import torch

    captions: list[str] = []

    def loaders() -> Iterator[Callable[[], Any]]:
        for load, c in task.items():
            captions.append(c)
            yield load

    models = list(experts) + list(singles)
    with torch.no_grad():
        feats = _image_features(models, loaders(), device, batch)
        if not captions:
            raise EvalError(f"retrieval task {task.name}: no captioned images in {task.source}")
        sims = []
        for m, f in zip(models, feats):
            t = _encode_texts(m, captions, device, batch)
            sims.append((f @ t.T).cpu().numpy().astype(np.float64))  # cosine similarities
    weights, groups = ens.weights(captions)  # MoDE: the same weighting, from the query texts
    n = len(experts)
    scored = {m.name: s for m, s in zip(models, sims)}
    inputs = _ensemble_inputs(experts, sims[:n], ensemble_inputs)
    scored["mean_ensemble"] = combine_logits(inputs, np.full(n, 1.0 / n))
    scored["mode_ensemble"] = combine_logits(inputs, weights)
    recall = {}
    for k, s in scored.items():
        i2t, t2i = recall_at_k(s), recall_at_k(s.T)
        r = {f"image_to_text_{m}": v for m, v in i2t.items()} | {f"text_to_image_{m}": v for m, v in t2i.items()}
        r["mean_recall"] = float(np.mean(list(r.values())))
        recall[k] = r
    best = max(range(n), key=lambda k: recall[experts[k].name]["mean_recall"])
    recall["best_expert"] = recall[experts[best].name]
    return {
        "kind": "retrieval",
        "source": task.source,
        "n_pairs": len(captions),
        "expert_weights": weights.tolist(),
        "captions_per_expert": groups.tolist(),
        "best_expert": experts[best].name,
        "recall": recall,
    }


# --------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class EvalConfig:
    run: Path
    clusters: Path
    data: list[str]
    out: Path
    baselines: list[str] = field(default_factory=list)
    retrieval: list[str] = field(default_factory=list)
    classes: Path | str | None = None  # a JSON-list file or a built-in name (CLASS_SETS)
    templates: Path | str | None = None  # a JSON-list file or a built-in name (TEMPLATE_SETS)
    label_field: str = "label"
    caption_key: str = "caption"
    embedder: str | None = None
    device: str = "cpu"
    batch_size: int = 256
    ensemble_inputs: str = "cosine"  # ENSEMBLE_INPUTS: MoDE's plain cosines, or "scaled"


def _parse_baseline(spec: str) -> tuple[str, Path]:
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        return name, Path(path)
    p = Path(spec)
    # RUN/NAME/checkpoints/final.pt -> NAME; a run folder -> its seed checkpoint
    if p.is_dir():
        p = p / "seed" / "checkpoints" / "final.pt" if (p / "seed").is_dir() else p / "checkpoints" / "final.pt"
    name = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
    return name, p


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every task; returns the results dict (also written under cfg.out)."""
    from mode_fast.clusters import ClusterFolder  # torch and the kernels: only when evaluating

    folder = ClusterFolder(cfg.clusters)
    centers = folder.centers()
    centers_path = folder.centers_path
    n = centers.n_experts
    expert_paths = find_experts(cfg.run, n)
    singles: list[tuple[str, Path]] = [_parse_baseline(b) for b in cfg.baselines]
    if not singles:
        seed = cfg.run / "seed" / "checkpoints" / "final.pt"
        if not seed.is_file():
            raise EvalError(f"seed checkpoint {seed} not found: pass --baseline CKPT for the single model")
        singles = [("seed", seed)]
    names = [s[0] for s in singles]
    clash = [
        x
        for x in names
        if names.count(x) > 1 or x.startswith("expert_") or x in ("best_expert", "mean_ensemble", "mode_ensemble")
    ]
    if clash:
        raise EvalError(f"single-model name {clash[0]!r} is used twice or clashes with a method: use NAME=CKPT")
    # Tasks are parsed (and their class lists checked) before any model loads: fail fast.
    tasks = [load_task(s, cfg.classes, cfg.templates, cfg.label_field) for s in cfg.data]
    rtasks = [load_retrieval_task(s, cfg.caption_key) for s in cfg.retrieval]
    all_names = [t.name for t in tasks] + [t.name for t in rtasks]
    if len(set(all_names)) != len(all_names):
        raise EvalError(f"two tasks are named alike in {all_names}: name them with NAME=SPEC")
    ens = Ensembler(centers, _embedder_for(folder, cfg.embedder, cfg.device))
    experts = load_models([(f"expert_{k}", p) for k, p in enumerate(expert_paths)], cfg.device)
    single_models = load_models(singles, cfg.device)

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "run": str(cfg.run),
        "clusters": str(centers_path),
        "n_experts": n,
        "embedder": getattr(ens.embedder, "name", str(cfg.embedder)),
        "experts": {m.name: str(m.checkpoint) for m in experts},
        "single_models": [m.name for m in single_models],
        "single_model_checkpoints": {m.name: str(m.checkpoint) for m in single_models},
        "device": cfg.device,
        "ensemble_inputs": cfg.ensemble_inputs,
        "logit_scales": {m.name: float(m.model.logit_scale.detach().exp()) for m in [*experts, *single_models]},
        "tasks": {},
        "retrieval": {},
    }
    for task in tasks:
        log.info("classification %s (%d classes)", task.name, len(task.classes))
        results["tasks"][task.name] = evaluate_classification(
            task, experts, single_models, ens, cfg.device, cfg.batch_size, cfg.ensemble_inputs
        )
        results["tasks"][task.name] |= task.reads.skips_dict()  # read: n_images
    for rtask in rtasks:
        log.info("retrieval %s", rtask.name)
        results["retrieval"][rtask.name] = evaluate_retrieval(
            rtask, experts, single_models, ens, cfg.device, cfg.batch_size, cfg.ensemble_inputs
        )
        results["retrieval"][rtask.name] |= rtask.reads.skips_dict()  # read: n_pairs
    methods = method_order(results, n)
    if results["tasks"]:
        results["average"] = {
            metric: {m: float(np.mean([t[metric][m] for t in results["tasks"].values()])) for m in methods}
            for metric in ("top1", "top5")
        }
    if results["retrieval"]:
        results["retrieval_average"] = {
            m: float(np.mean([t["recall"][m]["mean_recall"] for t in results["retrieval"].values()])) for m in methods
        }
    write_outputs(results, cfg.out)
    return results


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="train run folder (RUN/seed, RUN/expert_K)")
    parser.add_argument(
        "--clusters", type=Path, required=True, help="`mode-fast cluster` output folder (or its centers.npz)"
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="SPEC",
        help="classification tasks: [NAME=]shards/folder/CSV/sample eval dir, or "
        "[NAME=]sklearn:digits[:N] (scikit-learn's bundled handwritten digits; N: a "
        "class-balanced subset)",
    )
    parser.add_argument(
        "--retrieval",
        nargs="*",
        default=[],
        metavar="SHARDS",
        help="[NAME=]captioned webdataset shards for image-text retrieval",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="[NAME=]CKPT",
        help="single model(s) to compare (default: RUN/seed/checkpoints/final.pt); repeatable",
    )
    parser.add_argument(
        "--classes",
        metavar="FILE|imagenet",
        help="JSON list of class names, or `imagenet` for open_clip's 1000 ImageNet class names "
        "(default: classes.json beside the data)",
    )
    parser.add_argument(
        "--templates",
        metavar="FILE|openai-imagenet|simple-imagenet",
        help="JSON list of prompt templates with '{}', or `openai-imagenet` (open_clip's 80) / "
        "`simple-imagenet` (its 7) (default: templates.json beside the data, else the "
        "task's own for sklearn:digits, else simple-imagenet)",
    )
    parser.add_argument("--label-field", default="label", help="label field of .json when there is no .cls")
    parser.add_argument(
        "--caption-key",
        default="caption",
        help="retrieval captions, as in curate and cluster: a member extension of that name, else "
        "a .json field; the default also falls back to .txt (default: %(default)s)",
    )
    parser.add_argument(
        "--embedder",
        default=None,
        help="clustering text encoder: minilm, hashN or package.module:callable (default: the one "
        "stored with the clusters, embedder.json)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--ensemble-inputs",
        choices=ENSEMBLE_INPUTS,
        default="cosine",
        help="what the ensembles combine: the experts' plain cosine similarities (MoDE's, "
        "default) or each times the expert's own logit scale (scaled)",
    )


def run(args: argparse.Namespace) -> int:
    if not args.data and not args.retrieval:
        raise ConfigError("nothing to evaluate: give --data SPEC... and/or --retrieval SHARDS...")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg = EvalConfig(
        run=args.run,
        clusters=args.clusters,
        data=list(args.data),
        out=args.out,
        baselines=list(args.baseline),
        retrieval=list(args.retrieval),
        classes=args.classes,
        templates=args.templates,
        label_field=args.label_field,
        caption_key=args.caption_key,
        embedder=args.embedder,
        device=args.device,
        batch_size=args.batch_size,
        ensemble_inputs=args.ensemble_inputs,
    )
    results = evaluate(cfg)
    print(markdown_table(results), end="")
    print(f"results in {args.out}/results.json, results.md, accuracy.png, expert_weights.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from mode_fast.cli import job_main

    return job_main("mode-fast eval", sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
