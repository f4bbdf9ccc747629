"""Evaluation tasks: the readers behind `mode-fast eval --data/--retrieval`, with their
class names and prompt templates.

Classification (each --data SPEC, optionally NAME=SPEC):
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
- a CLIP_benchmark webdataset folder (LAION-AI/CLIP_benchmark `build_wds_dataset`, the
  `wds_*` datasets on the Hugging Face hub), as it is: FOLDER/SPLIT/0.tar..(nshards-1).tar
  (SPLIT `test` unless the spec ends in `:SPLIT`, e.g. `cars=wds_cars:train`), labels in
  .cls, class names in FOLDER/classnames.txt and templates (with `{c}`) in
  FOLDER/zeroshot_classification_templates.txt, one a line. A folder whose
  dataset_type.txt says `retrieval` is a retrieval task (--retrieval), several captions per
  image (.txt lines).
Class names: --classes FILE (a JSON list), or --classes imagenet (open_clip's 1000 ImageNet
names, index = the usual sorted-wnid label), else classes.json beside the data. Prompt
templates (each with one "{}"): --templates FILE, or --templates openai-imagenet (open_clip's
80 OPENAI_IMAGENET_TEMPLATES) or simple-imagenet (its 7 SIMPLE_IMAGENET_TEMPLATES), else
templates.json beside the data, else the task's own (digits) or SIMPLE_IMAGENET_TEMPLATES.
`--classes cb:NAME` / `--templates cb:NAME` take the lists the clip-benchmark package ships
(clip_benchmark/datasets/en_classnames.json, en_zeroshot_classification_templates.json;
read as package data, nothing of clip_benchmark is imported). For a CLIP_benchmark folder
the options come first, then its own classnames.txt / zeroshot_classification_templates.txt.
Retrieval: captioned webdataset shards (caption from .txt, else a .json field), one caption
per image; or a CLIP_benchmark retrieval folder, each image with the captions on the lines
of its .txt (`RetrievalTask.multi`).

Images are decoded as the items are read (mode_fast.data.images.decode_image: bounded
memory, JPEGs over the pixel limit decoded reduced): an image that cannot be decoded or is
over the pixel limit is skipped, logged and counted by reason and shard (for a folder or
CSV task the "shard" is the folder or CSV, the key the image's path in it) in the task's
`reads` (results.json, results.md) and `bad`; scoring stops with one line when they pass
--max-bad-share of the task's images (`mode_fast.evaluation.scoring.task_scores`).

Each task lists the files its items read and the reader options that matter
(`task_fingerprint`, what eval's run.json records). Library module: never imports a job
module.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.core.errors import InputError
from mode_fast.core.runs import fingerprint
from mode_fast.data.images import BadImages, decode_image
from mode_fast.data.io import (
    ReadReport,
    ShardError,
    TarGroup,
    describe_fields,
    distinct_files,
    iter_samples,
    sample_caption,
)
from mode_fast.evaluation.ensemble import check_class_names

log = logging.getLogger(__name__)

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
    reads: ReadReport = field(default_factory=ReadReport)  # skips counted by items()
    files: list[Path] = field(default_factory=list)  # what items() reads (task_fingerprint)
    options: dict[str, Any] = field(default_factory=dict)  # reader options that change items()
    bad: BadImages = field(default_factory=BadImages)  # images items() skipped as bad


@dataclass
class RetrievalTask:
    """Captioned images: pair i is (image i, caption i); with `multi` (a CLIP_benchmark
    retrieval folder) items() yields each image with the list of its captions."""

    name: str
    source: str
    items: Callable[[], Iterator[tuple[Callable[[], Any], str]]]
    kind: str = "retrieval"
    reads: ReadReport = field(default_factory=ReadReport)
    files: list[Path] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    bad: BadImages = field(default_factory=BadImages)
    multi: bool = False  # several captions per image

    @property
    def classes(self) -> list[str]:  # no class names: the captions are the texts
        return []

    @property
    def templates(self) -> list[str]:
        return []


def task_fingerprint(task: ClassificationTask | RetrievalTask) -> dict[str, Any]:
    """What a task's scores depend on besides the models, for a run manifest: its files
    (each one's path, size and mtime; `mode_fast.core.runs.fingerprint`), class names, templates
    and reader options, as one digest, with the total size and newest mtime to show."""
    prints = [fingerprint(p) for p in task.files]
    identity = [task.kind, task.source, task.classes, task.templates, task.options, prints]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {
        "path": task.source,
        "files": len(prints),
        "size": sum(p["size"] for p in prints),
        "mtime_ns": max((p["mtime_ns"] for p in prints), default=0),
        "digest": digest,
    }


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
# be class names, mode_fast.evaluation.ensemble.check_class_names), so the second of each pair takes
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


# --------------------------------------------------------------------------- CLIP_benchmark
CB_PREFIX = "cb:"
CB_CLASSES = "en_classnames.json"
CB_TEMPLATES = "en_zeroshot_classification_templates.json"
CB_SPLIT = "test"  # build_wds_dataset's default split
CB_CLASSNAMES_TXT = "classnames.txt"
CB_TEMPLATES_TXT = "zeroshot_classification_templates.txt"
CB_TYPE_TXT = "dataset_type.txt"
CB_NSHARDS_TXT = "nshards.txt"
CB_DATASET_PREFIXES = ("wds/", "vtab/", "tfds/")  # CLIP_benchmark looks NAME up with and without


def cb_template(template: str) -> str:
    """CLIP_benchmark's templates mark the class with `{c}` (template.format(c=name)); here
    with `{}`."""
    return template.replace("{c}", "{}") if isinstance(template, str) else template


def _cb_package_json(filename: str, option: str) -> dict[str, Any]:
    """One of the JSON files clip-benchmark ships in clip_benchmark/datasets/, read as data:
    the package is located, not imported (its builder imports torchvision, datasets, ...)."""
    import importlib.util

    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(f"{option} {CB_PREFIX}NAME needs the clip-benchmark package: pip install 'clip-benchmark>=1.6'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / filename
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"{option} {CB_PREFIX}NAME: cannot read clip-benchmark's {path} ({e})") from e
    if not isinstance(value, dict):
        raise EvalError(f"{option} {CB_PREFIX}NAME: clip-benchmark's {path} is not a JSON object")
    return value


def _cb_lookup(table: dict[str, Any], name: str, option: str, what: str) -> Any:
    """table[NAME], NAME also without a wds/, vtab/ or tfds/ prefix (as CLIP_benchmark looks
    it up); an unknown NAME is one line naming the close ones."""
    import difflib

    keys = [name] + [name[len(p) :] for p in CB_DATASET_PREFIXES if name.startswith(p)]
    for key in keys:
        if key in table:
            return table[key]
    close = difflib.get_close_matches(keys[-1], list(table), n=5, cutoff=0.5)
    hint = f"close names: {', '.join(CB_PREFIX + c for c in close)}" if close else f"known: {', '.join(sorted(table))}"
    tail = "; a CLIP_benchmark folder's classnames.txt is read without --classes" if what == "class names" else ""
    raise EvalError(f"{option} {CB_PREFIX}{name}: clip-benchmark ships no {what} for {name!r} ({hint}){tail}")


def cb_classes(name: str) -> list[str]:
    """--classes cb:NAME: clip-benchmark's English class names of NAME. Its imagenet1k is
    open_clip's list, with the same two repeated names: they take the same renames as
    --classes imagenet (IMAGENET_RENAMES), so labels stay unambiguous."""
    names = list(_cb_lookup(_cb_package_json(CB_CLASSES, "--classes"), name, "--classes", "class names"))
    if len(names) == 1000 and name.rsplit("/", 1)[-1] == "imagenet1k":
        for i, new in IMAGENET_RENAMES.items():
            names[i] = new
    return names


def cb_templates(name: str) -> list[str]:
    """--templates cb:NAME: clip-benchmark's English zero-shot templates of NAME ({c} -> {})."""
    got = _cb_lookup(_cb_package_json(CB_TEMPLATES, "--templates"), name, "--templates", "templates")
    if not isinstance(got, list):  # class-specific prompts (CuPL) are a dict: not a template list
        raise EvalError(f"--templates {CB_PREFIX}{name}: clip-benchmark's entry is not a list of templates")
    return [cb_template(t) for t in got]


def _option_list(
    value: Path | str | None, option: str, shortcuts: Sequence[str], load_named: Callable[[str], list[str]]
) -> tuple[list[Any], str] | None:
    """--classes / --templates: a shortcut name (given exactly, e.g. `imagenet`), `cb:NAME`
    (clip-benchmark's lists) or a JSON-list file; (the list, where it came from) or None when
    the option is not given. A file whose name is a shortcut is still reachable as ./NAME."""
    if value is None:
        return None
    if isinstance(value, str) and value in shortcuts:
        return load_named(value), f"{option} {value}"
    if isinstance(value, str) and value.startswith(CB_PREFIX) and not Path(value).is_file():
        load_cb = cb_classes if option == "--classes" else cb_templates
        return load_cb(value[len(CB_PREFIX) :]), f"{option} {value}"
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


def _decoded(
    source: bytes | Path, shard: str | Path, key: str, reads: ReadReport, bad: BadImages
) -> Callable[[], Any] | None:
    """The loader of a decoded image, or None when it is skipped (logged, counted)."""
    decoded = decode_image(source)
    if decoded.image is None:
        log.warning("%s sample %s: skipped (%s: %s)", shard, key, decoded.reason, decoded.detail)
        reads.skip(shard, str(decoded.reason))
        bad.add([(str(shard), key, str(decoded.reason))])
        return None
    reads.read += 1
    image = decoded.image
    return lambda: image


def _list_tars(spec: str) -> list[Path]:
    """The tars of a folder, a glob or one file, as named (a link stays the link, and one
    to nothing is an error naming it when read); a file reached by two names once."""
    p = Path(spec)
    if p.is_dir():
        found = sorted(p.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        found = sorted(Path(x) for x in glob.glob(spec))
    else:
        found = [p] if p.is_file() or p.is_symlink() else []
    if not found:
        raise EvalError(f"no webdataset shards found at {spec}")
    return distinct_files(found)


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
# (mode_fast.demo.sample.DOMAINS; captions also say "number 1", "numeral one"), so the ten
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

    import sklearn

    # no files: the data ship with scikit-learn, so its version stands for them
    return ClassificationTask(
        name or dataset, spec, classes, templates, items_digits, options={"sklearn": sklearn.__version__}
    )


def load_task(
    spec: str,
    classes_file: Path | str | None = None,
    templates_file: Path | str | None = None,
    label_field: str = "label",
) -> ClassificationTask:
    """A classification task from one --data SPEC (see the module docstring)."""
    name, path_text = split_spec(spec)
    if path_text.startswith(SKLEARN_PREFIX):
        return load_sklearn_task(name, path_text[len(SKLEARN_PREFIX) :], classes_file, templates_file)
    cb = cb_folder(path_text)
    if cb is not None:
        return _cb_task(name, *cb, classes_file, templates_file, label_field)
    path = Path(path_text)
    # The sample's root folder: use its eval split.
    if path.is_dir() and (path / "eval").is_dir() and not list(path.glob("*.tar")):
        path = path / "eval"
    name = name or (path.parent.name + "/" + path.name if path.name == "eval" else path.stem or path.name)
    if path.suffix.lower() == ".csv":
        return _csv_task(name, path, classes_file, templates_file)
    if path.is_dir() and not list(path.glob("*.tar")):
        return _folder_task(name, path, classes_file, templates_file)
    return _shard_task(name, path, classes_file, templates_file, label_field)


def split_spec(spec: str) -> tuple[str, str]:
    """NAME=SPEC -> (NAME, SPEC); a SPEC alone (or an existing path with '=') -> ("", SPEC)."""
    name, _, path_text = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    return name, path_text


def _csv_task(
    name: str, path: Path, classes_file: Path | str | None, templates_file: Path | str | None
) -> ClassificationTask:
    if not path.is_file():
        raise EvalError(f"CSV {path} not found")
    rows = _read_csv(path)
    labels = [lab for _, lab in rows]
    fallback = None if all(lab.strip().isdigit() for lab in labels) else sorted(set(labels))
    classes, templates = _resolve_meta(path, classes_file, templates_file, fallback)
    resolved = [(path.parent / p, _label_index(lab, classes, f"{path} row {i + 1}")) for i, (p, lab) in enumerate(rows)]
    for p, _ in resolved:
        if not p.is_file():
            raise EvalError(f"{path}: image {p} not found")

    report, bad = ReadReport(), BadImages()

    def items_csv() -> Iterator[tuple[Callable[[], Any], int]]:
        report.clear()
        bad.clear()
        for (given, _), (p, y) in zip(rows, resolved):
            load = _decoded(p, path, given, report, bad)
            if load is not None:
                yield load, y

    files = [path, *dict.fromkeys(p for p, _ in resolved)]
    return ClassificationTask(name, str(path), classes, templates, items_csv, reads=report, files=files, bad=bad)


def _folder_task(
    name: str, path: Path, classes_file: Path | str | None, templates_file: Path | str | None
) -> ClassificationTask:
    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise EvalError(f"{path}: neither .tar shards nor one sub-folder per class")
    folder_names = [d.name for d in subdirs]
    classes, templates = _resolve_meta(path, classes_file, templates_file, [n.replace("_", " ") for n in folder_names])
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

    report, bad = ReadReport(), BadImages()

    def items_folder() -> Iterator[tuple[Callable[[], Any], int]]:
        report.clear()
        bad.clear()
        for f, y in files:
            load = _decoded(f, path, f.relative_to(path).as_posix(), report, bad)
            if load is not None:
                yield load, y

    return ClassificationTask(
        name, str(path), classes, templates, items_folder, reads=report, files=[f for f, _ in files], bad=bad
    )


def _shard_task(
    name: str, path: Path, classes_file: Path | str | None, templates_file: Path | str | None, label_field: str
) -> ClassificationTask:
    shards = _list_tars(str(path))
    classes, templates = _resolve_meta(shards[0].parent if not path.is_dir() else path, classes_file, templates_file)
    return _labelled_shards(name, str(path), shards, classes, templates, label_field)


def _labelled_shards(
    name: str,
    source: str,
    shards: list[Path],
    classes: list[str],
    templates: list[str],
    label_field: str,
    options: dict[str, Any] | None = None,
) -> ClassificationTask:
    """The task of labelled webdataset shards (one reader for plain and CLIP_benchmark folders)."""
    report, bad = ReadReport(), BadImages()

    def items_tar() -> Iterator[tuple[Callable[[], Any], int]]:
        report.clear()
        bad.clear()
        for group, shard in _iter_tar(shards, report):
            where = f"{shard} sample {group.key}"
            image = _image_member(group)
            if image is None:
                raise EvalError(
                    f"{where}: no image member ({', '.join('.' + e for e in IMAGE_EXTS)}); "
                    f"it has {describe_fields(group.sample())}"
                )
            label = _label_index(_tar_label(group, label_field, where), classes, where)
            load = _decoded(image, shard, group.key, report, bad)
            if load is not None:
                yield load, label

    return ClassificationTask(
        name,
        source,
        classes,
        templates,
        items_tar,
        reads=report,
        files=shards,
        options={"label_field": label_field, **(options or {})},
        bad=bad,
    )


def cb_folder(path_text: str) -> tuple[Path, str] | None:
    """(FOLDER, SPLIT) when `path_text` is a CLIP_benchmark webdataset folder, FOLDER or
    FOLDER:SPLIT (build_wds_dataset's layout: FOLDER/SPLIT/*.tar beside classnames.txt,
    zeroshot_classification_templates.txt or dataset_type.txt, or a split's nshards.txt), else
    None. A folder with .tar shards of its own is a plain shard folder."""
    path, split = Path(path_text), CB_SPLIT
    if not path.exists() and ":" in path_text:
        head, _, tail = path_text.rpartition(":")
        if tail and "/" not in tail and Path(head).is_dir():
            path, split = Path(head), tail
    if not path.is_dir() or any(path.glob("*.tar")):
        return None
    markers = [path / CB_CLASSNAMES_TXT, path / CB_TEMPLATES_TXT, path / CB_TYPE_TXT]
    found = any(m.is_file() for m in markers) or any(path.glob(f"*/{CB_NSHARDS_TXT}"))
    return (path, split) if found else None


def cb_dataset_type(folder: Path) -> str:
    """dataset_type.txt (`classification` when absent, as build_wds_dataset assumes)."""
    f = folder / CB_TYPE_TXT
    return f.read_text(encoding="utf-8").strip().lower() if f.is_file() else "classification"


def _numeric_name(p: Path) -> tuple[int, str]:
    return (int(p.stem), "") if p.stem.isdigit() else (1 << 62, p.name)


def cb_shards(folder: Path, split: str) -> list[Path]:
    """SPLIT's shards: 0.tar..(n-1).tar by SPLIT/nshards.txt (build_wds_dataset reads exactly
    those), else every .tar in SPLIT, in number order."""
    where = folder / split
    if not where.is_dir():
        have = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.tar")))
        raise EvalError(
            f"{folder}: CLIP_benchmark folder without a {split}/ split (it has: {', '.join(have) or 'none'}); "
            "pick one with FOLDER:SPLIT"
        )
    nfile = where / CB_NSHARDS_TXT
    if nfile.is_file():
        text = nfile.read_text(encoding="utf-8").strip()
        if not text.isdigit() or int(text) < 1:
            raise EvalError(f"{nfile}: expected a positive shard count, got {text[:40]!r}")
        shards = [where / f"{i}.tar" for i in range(int(text))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise EvalError(f"{nfile} says {text} shards but {where} lacks {', '.join(missing[:5])}")
        return shards
    shards = sorted(where.glob("*.tar"), key=_numeric_name)
    if not shards:
        raise EvalError(f"no webdataset shards found in {where}")
    return shards


def _cb_lines(path: Path) -> list[str] | None:
    """A CLIP_benchmark .txt list: one entry a line, each stripped (as build_wds_dataset)."""
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _cb_task(
    name: str,
    folder: Path,
    split: str,
    classes_file: Path | str | None,
    templates_file: Path | str | None,
    label_field: str,
) -> ClassificationTask:
    """A CLIP_benchmark classification folder (see cb_folder): --classes / --templates
    first, then its classnames.txt / zeroshot_classification_templates.txt."""
    kind = cb_dataset_type(folder)
    if kind == "retrieval":
        raise EvalError(f"{folder}: a CLIP_benchmark retrieval dataset ({CB_TYPE_TXT}): pass it as --retrieval")
    if kind != "classification":
        raise EvalError(f"{folder}: CLIP_benchmark dataset type {kind!r} ({CB_TYPE_TXT}) is not supported here")
    shards = cb_shards(folder, split)
    given = option_classes(classes_file)
    names = _cb_lines(folder / CB_CLASSNAMES_TXT)
    if given is not None:
        classes = given[0]
    elif names is not None:
        classes = _checked_classes(names, str(folder / CB_CLASSNAMES_TXT))
    else:
        raise EvalError(f"{folder}: no {CB_CLASSNAMES_TXT}: pass --classes FILE or --classes cb:NAME")
    given_t = option_templates(templates_file)
    lines = _cb_lines(folder / CB_TEMPLATES_TXT)
    if given_t is not None:
        templates = given_t[0]
    elif lines is not None:
        templates = check_templates([cb_template(t) for t in lines if t], str(folder / CB_TEMPLATES_TXT))
    else:
        templates = default_templates()
    name = name or (folder.name if split == CB_SPLIT else f"{folder.name}:{split}")
    return _labelled_shards(name, f"{folder}:{split}", shards, classes, templates, label_field, {"split": split})


def _tar_label(group: TarGroup, label_field: str, where: str) -> Any:
    """A sample's label: its .cls member, else the .json field `label_field`."""
    if "cls" in group.exts:
        return group.read("cls").decode("utf-8", "replace").strip()
    if "json" in group.exts:
        try:
            meta = json.loads(group.read("json"))
        except ValueError as e:
            raise EvalError(f"{where}: bad .json ({e})") from e
        if not isinstance(meta, dict) or label_field not in meta:
            raise EvalError(
                f"{where}: no .cls member and no {label_field!r} field in .json "
                f"(--label-field); it has {describe_fields(group.sample())}"
            )
        return meta[label_field]
    raise EvalError(
        f"{where}: no label (.cls member or .json field {label_field!r}); it has {describe_fields(group.sample())}"
    )


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


def _check_retrieval_key(shards: Sequence[Path], caption_key: str) -> None:
    """A wrong --caption-key is one error naming the key and the fields the first sample
    has, up front, rather than every pair skipped after the models have loaded."""
    samples = _iter_tar(shards[:1], ReadReport())
    with contextlib.closing(samples):
        first = next(samples, None)
        if first is None:
            return  # the task's own check reports an empty task
        group, shard = first
        if _image_member(group) is not None and sample_caption(group.sample(), caption_key)[1] == "missing_caption":
            raise EvalError(
                f"--caption-key {caption_key!r}: the first sample {group.key!r} of {shard} has no "
                f"member or .json field {caption_key!r}; it has {describe_fields(group.sample())}"
            )


def load_retrieval_task(spec: str, caption_key: str = "caption") -> RetrievalTask:
    """Captioned webdataset shards; `caption_key` has curate's meaning (io.sample_caption).
    A CLIP_benchmark retrieval folder reads its own way (`_cb_retrieval_task`)."""
    name, path_text = split_spec(spec)
    cb = cb_folder(path_text)
    if cb is not None:
        return _cb_retrieval_task(name, *cb)
    shards = _list_tars(path_text)
    _check_retrieval_key(shards, caption_key)
    report, bad = ReadReport(), BadImages()

    def items() -> Iterator[tuple[Callable[[], Any], str]]:
        report.clear()
        bad.clear()
        for group, shard in _iter_tar(shards, report):
            where = f"{shard} sample {group.key}"
            image = _image_member(group)
            caption, reason = sample_caption(group.sample(), caption_key)
            if caption is not None and not caption.strip():
                reason = "empty_caption"
            if image is None or reason is not None:
                reason = reason or "no image"
                log.warning("%s: skipped (%s)", where, reason)
                report.skip(shard, reason)
                continue
            load = _decoded(image, shard, group.key, report, bad)
            if load is not None:
                yield load, caption

    return RetrievalTask(
        name or Path(path_text).stem or "retrieval",
        path_text,
        items,
        reads=report,
        files=shards,
        options={"caption_key": caption_key},
        bad=bad,
    )


def _cb_retrieval_task(name: str, folder: Path, split: str) -> RetrievalTask:
    """A CLIP_benchmark retrieval folder: each image with its captions, the lines of its .txt
    (build_wds_dataset: .txt mapped through str.splitlines); blank lines are no captions, an
    image with none is skipped (empty_caption)."""
    kind = cb_dataset_type(folder)
    if kind != "retrieval":
        raise EvalError(
            f"{folder}: a CLIP_benchmark {kind} dataset ({CB_TYPE_TXT} absent or not 'retrieval'): pass it as --data"
        )
    shards = cb_shards(folder, split)
    report, bad = ReadReport(), BadImages()

    def items() -> Iterator[tuple[Callable[[], Any], list[str]]]:
        report.clear()
        bad.clear()
        for group, shard in _iter_tar(shards, report):
            where = f"{shard} sample {group.key}"
            image = _image_member(group)
            text = group.read("txt").decode("utf-8", "replace") if "txt" in group.exts else None
            captions = [c for c in (text or "").splitlines() if c.strip()]
            if image is None or not captions:
                reason = "no image" if image is None else ("missing_caption" if text is None else "empty_caption")
                log.warning("%s: skipped (%s)", where, reason)
                report.skip(shard, reason)
                continue
            load = _decoded(image, shard, group.key, report, bad)
            if load is not None:
                yield load, captions

    return RetrievalTask(
        name or (folder.name if split == CB_SPLIT else f"{folder.name}:{split}"),
        f"{folder}:{split}",
        items,
        reads=report,
        files=shards,
        options={"layout": "clip_benchmark", "split": split},
        bad=bad,
        multi=True,
    )
