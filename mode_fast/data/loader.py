"""Training loader for webdataset shards: streaming, shuffled, resumable, reader-count free.

The order of one epoch is a pure function of (seed, epoch), whatever the number of loader
workers or DDP ranks, so a resumed run and a two-process run see the same global batches
as an uninterrupted one-process run:

1. Index (once, before training): every shard's tar headers are scanned (data is seeked
   over, not read) and the usable samples are kept: those with the image and caption keys,
   in `keep_keys` (a uid list: `mode_fast.data.io.read_key_list`), and passing the expert filter. This gives the
   per-shard counts that size an epoch; an epoch is `total // global_batch` steps and the
   tail is dropped, never wrapped around.
2. Epoch plan: the shards are permuted with rng(seed, epoch) and their samples concatenated
   into one stream; the stream is shuffled locally by sorting `position + U(0, window)`,
   so each sample moves at most `window` places and a reader holds about `window` raw
   samples at a time (a shuffle buffer whose effect is known in advance).
3. Global batch b is plan[b*G:(b+1)*G]; rank r takes its contiguous 1/world slice; loader
   worker w of a rank builds batches start+w, start+w+nw, ... (the DataLoader hands them
   out round-robin, so they arrive in order). A worker scans the headers of the shards its
   samples lie in and reads, decodes and transforms only its own samples. Resuming at
   batch p skips the earlier batches without reading their data.
4. Image augmentation draws from a torch RNG seeded by (seed, epoch, position), so a
   sample's tensor does not depend on which process made it.
5. Bad images are filled, not dropped: an image that cannot be decoded or is over the
   pixel limit (mode_fast.data.images.decode_image) is skipped where its batch is built,
   and its slot is filled from the slot's column: epoch position p's column is the
   positions p+G, p+2G, ... (wrapping to the start of the epoch, the dropped tail
   included), and the first of them that decodes fills the slot, keeping the slot's
   augmentation seed (seed, epoch, p). Columns of one global batch are disjoint, so a
   batch never holds a sample twice, and the choice depends on the plan and the data
   alone: the batches are the same for any number of workers and ranks and on resume.
   The substitute is read by a header scan of its shard (bad images are rare; the job
   stops past --max-bad-share). Each batch carries the (shard, key, reason) of its own
   slots' bad samples (`skips`), not of bad candidates passed over (those are counted
   in their own batch); the trainer counts the distinct ones. A column with no
   decodable image at all is an error (SampleError).

Sample layout and damage: shards are walked by mode_fast.data.io.iter_samples, the walk
every job shares (webdataset's `KEY.EXT` grouping, one documented key rule, resync past a
damaged header). Samples skipped for damage, a missing key or a filter are counted by
reason and shard in `DataIndex.report` (train writes them to data.json and its log).
A worker's ModeFastError is raised in the trainer's process as one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mode_fast.core.errors import ConfigError, InputError, ModeFastError
from mode_fast.data.images import decode_image
from mode_fast.data.io import DataKeyError, ReadReport, TarGroup, iter_samples, member_ext

log = logging.getLogger(__name__)

DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp"
DEFAULT_CAPTION_KEY = "txt"


class SampleError(InputError):
    """No sample can fill a batch slot: every image of its column is bad."""


# --------------------------------------------------------------------------- sample spec
@dataclass(frozen=True)
class SampleSpec:
    """Which members of a sample hold the image and the caption.

    image_key: extensions tried in order, ';'-separated (open_clip's "jpg;png;webp").
    caption_key: an extension ("txt") whose member is the caption, or "json:FIELD" for a
    field of the sample's .json member (dotted for nested fields: "json:meta.caption").
    """

    image_key: str = DEFAULT_IMAGE_KEY
    caption_key: str = DEFAULT_CAPTION_KEY

    @property
    def image_exts(self) -> tuple[str, ...]:
        exts = tuple(member_ext(e) for e in self.image_key.split(";") if e.strip())
        if not exts:
            raise DataKeyError(f"image key {self.image_key!r} names no extension")
        return exts

    @property
    def caption_ext(self) -> str:
        return "json" if self.caption_key.startswith("json:") else member_ext(self.caption_key)

    @property
    def caption_field(self) -> list[str] | None:
        if not self.caption_key.startswith("json:"):
            return None
        path = self.caption_key[len("json:") :]
        if not path:
            raise DataKeyError(f"caption key {self.caption_key!r}: give a field, e.g. json:caption")
        return path.split(".")

    def image_ext_of(self, members: Mapping[str, Any]) -> str | None:
        return next((e for e in self.image_exts if e in members), None)

    def caption_from_bytes(self, raw: bytes) -> str | None:
        """The caption, or None when a json sample lacks the field."""
        text = raw.decode("utf-8", errors="replace")
        fields = self.caption_field
        if fields is None:
            return text.strip()
        value: Any = json.loads(text)
        for name in fields:
            if not isinstance(value, dict) or name not in value:
                return None
            value = value[name]
        return value.strip() if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------- tar reading
# Shards are walked by mode_fast.data.io (iter_samples: the one key rule, resync past a
# damaged header, skips counted); this module only decides which samples are usable.
def check_first_sample(shard: Path, spec: SampleSpec) -> None:
    """Raise DataKeyError when the first sample lacks the image or caption key.

    open_clip's webdataset pipeline silently drops every such sample and then waits
    forever for a batch; failing on the first sample names the problem instead.
    """
    samples = iter_samples(shard, read_data=False)
    with contextlib.closing(samples):  # the walk stays open while the first sample is read
        first = next(samples, None)
        if first is not None:
            _check_sample(first, shard, spec)
    if first is None:
        raise DataKeyError(f"shard {shard} holds no samples")


def _check_sample(first: TarGroup, shard: Path, spec: SampleSpec) -> None:
    key, members = first.key, first.exts
    if spec.image_ext_of(members) is None:
        raise DataKeyError(
            f"image key {spec.image_key!r} not found in the first sample {key!r} of {shard}; "
            f"its members are {_members_text(members)}: pass --image-key with one of them"
        )
    if spec.caption_ext not in members:
        raise DataKeyError(
            f"caption key {spec.caption_key!r} not found in the first sample {key!r} of {shard}; "
            f"its members are {_members_text(members)}: pass --caption-key with one of them "
            f"(or json:FIELD for a field of the .json member)"
        )
    if spec.caption_field is not None:
        raw = first.read("json")
        if _caption_or_none(spec, raw) is None:
            raise DataKeyError(
                f"caption key {spec.caption_key!r}: field not found in {key}.json of {shard}; "
                f"its top-level fields are {_json_fields(raw)}"
            )


def _members_text(members: Mapping[str, Any]) -> str:
    return ", ".join("." + e for e in sorted(members)) or "(none)"


def _json_fields(raw: bytes) -> list[str]:
    try:
        meta = json.loads(raw)
    except ValueError:
        return []
    return sorted(meta) if isinstance(meta, dict) else []


def _caption_or_none(spec: SampleSpec, raw: bytes) -> str | None:
    try:
        return spec.caption_from_bytes(raw)
    except ValueError:  # not JSON: no field there
        return None


# --------------------------------------------------------------------------- filters
def share_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key), the same in every process.

    Python's hash() is salted per process, so a keyed digest is used instead.
    """
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass
class ExpertFilter:
    """MoDE's data for expert k: its own cluster plus `other_share` of every other cluster.

    Which other-cluster pairs come along is decided by share_hash(seed, key) < other_share,
    so the choice is deterministic and independent of order, shards and processes.
    Keys with no assignment are left out and counted in `unassigned`.
    """

    assignments: Mapping[str, int]
    expert: int
    other_share: float = 0.02
    seed: int = 0
    unassigned: int = 0
    first_unassigned: str | None = None  # for error messages: keys that match no assignment

    def __post_init__(self) -> None:
        if not 0.0 <= self.other_share <= 1.0:
            raise ValueError(f"other_share must be in [0, 1], got {self.other_share}")

    def __call__(self, key: str) -> bool:
        expert = self.assignments.get(key)
        if expert is None:
            self.unassigned += 1
            if self.first_unassigned is None:
                self.first_unassigned = key
            return False
        return expert == self.expert or share_hash(self.seed, key) < self.other_share


# --------------------------------------------------------------------------- index
@dataclass
class DataIndex:
    """Usable samples per shard, after the key checks and the filters; `report` counts
    the samples read and those skipped, by reason and shard (damage included)."""

    shards: list[Path]
    keys: list[list[str]]  # per shard, usable keys in tar order
    report: ReadReport = field(default_factory=ReadReport)

    @property
    def skipped(self) -> dict[str, int]:
        """reason -> count of samples skipped."""
        return dict(self.report.skipped)

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(k) for k in self.keys], dtype=np.int64)

    @property
    def total(self) -> int:
        return int(sum(len(k) for k in self.keys))


def _usable(group: TarGroup, spec: SampleSpec) -> str | None:
    """None when the sample can be trained on, else the reason it is skipped."""
    if spec.image_ext_of(group.exts) is None:
        return "no image member"
    if spec.caption_ext not in group.exts:
        return "no caption member"
    if spec.caption_field is not None and _caption_or_none(spec, group.read("json")) is None:
        return "no caption field in json"
    return None


def _scan_shard(shard: Path, spec: SampleSpec, keep: Callable[[str], bool] | None, report: ReadReport) -> list[str]:
    keys: list[str] = []
    for group in iter_samples(shard, report, read_data=False):
        reason = _usable(group, spec)
        if reason is None and keep is not None and not keep(group.key):
            reason = "filtered out"
        if reason is None:
            keys.append(group.key)
        else:
            report.skip(shard, reason)
    report.read += len(keys)
    return keys


def build_index(
    shards: Sequence[str | Path],
    spec: SampleSpec,
    keep: Callable[[str], bool] | None = None,
) -> DataIndex:
    """Scan shards (headers, plus .json members when the caption is a json field)."""
    paths = [Path(s) for s in shards]
    if not paths:
        raise FileNotFoundError("no training shards given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"training shard {p} not found")
        if not p.name.endswith(".tar"):
            raise ValueError(f"training reads webdataset .tar shards (uncompressed, seekable); got {p}")
    report = ReadReport()
    keys = []
    for i, p in enumerate(paths):
        if i == 0:
            check_first_sample(p, spec)
        keys.append(_scan_shard(p, spec, keep, report))
    index = DataIndex(paths, keys, report)
    if index.total == 0:
        raise ValueError(f"no usable samples in {len(paths)} shard(s); skipped: {index.skipped}")
    log.info("training data: %s", report.describe())
    return index


# --------------------------------------------------------------------------- epoch plan
def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]))


def epoch_plan(counts: np.ndarray, seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard_order, order): shards in stream order, and order[i] = stream position of the
    i-th sample of the epoch. A pure function of its arguments."""
    rng = _rng(seed, epoch, 0x5EED)
    shard_order = rng.permutation(len(counts))
    total = int(counts.sum())
    if window <= 1:
        return shard_order, np.arange(total, dtype=np.int64)
    jittered = np.arange(total, dtype=np.float64) + rng.random(total) * window
    return shard_order, np.argsort(jittered, kind="stable").astype(np.int64)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the augmentation RNG of one sample (same in every process)."""
    return int(_rng(seed, epoch, position, 0xA06).integers(0, 2**63 - 1))


# --------------------------------------------------------------------------- dataset
# {"images": [B,3,H,W], "texts": [B,L], "keys": list[str], "positions": [B] (the slots'),
#  "skips": [[shard, key, reason]] of the slots' own bad samples}
Batch = dict[str, Any]
RawSample = tuple[str, bytes, bytes, Path]  # key, image bytes, caption bytes, shard


@dataclass
class _Plan:
    """One epoch's plan (see the module doc), as every worker and rank computes it."""

    shard_order: np.ndarray
    order: np.ndarray  # epoch position -> stream position
    stream_start: np.ndarray  # stream position of each shard (in stream order) start


class ShardStream:
    """This rank's batches of one epoch from `start_batch` on (see the module doc);
    used through `TrainLoader`."""

    def __init__(
        self,
        index: DataIndex,
        spec: SampleSpec,
        preprocess: Callable[[Any], Any],
        tokenizer: Callable[[list[str]], Any],
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_window: int = 5000,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if index.total < global_batch:
            raise ConfigError(
                f"--batch-size {global_batch // world_size} on {world_size} process(es): {index.total} usable "
                f"samples are fewer than one global batch of {global_batch}; lower --batch-size or add data"
            )
        self.index = index
        self.spec = spec
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.steps_per_epoch = index.total // global_batch
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start batch {start_batch} outside epoch of {self.steps_per_epoch} steps")
        self.epoch, self.start_batch = epoch, start_batch

    def batch_positions(self, batch: int) -> range:
        """Epoch positions of this rank's part of global batch `batch`."""
        lo = batch * self.global_batch + self.rank * self.local_batch
        return range(lo, lo + self.local_batch)

    def plan(self) -> _Plan:
        """The current epoch's plan: a pure function of (index counts, seed, epoch, window)."""
        counts = self.index.counts
        shard_order, order = epoch_plan(counts, self.seed, self.epoch, self.shuffle_window)
        return _Plan(shard_order, order, np.concatenate([[0], np.cumsum(counts[shard_order])]))

    def iter_batches(self, worker: int = 0, num_workers: int = 1) -> Iterator[Batch]:
        plan = self.plan()
        my_batches = list(range(self.start_batch + worker, self.steps_per_epoch, num_workers))
        if not my_batches:
            return
        # stream position -> (batch, slot, epoch position)
        wanted: dict[int, tuple[int, int, int]] = {}
        for b in my_batches:
            for slot, pos in enumerate(self.batch_positions(b)):
                wanted[int(plan.order[pos])] = (b, slot, pos)
        pending: dict[int, dict[int, RawSample]] = {b: {} for b in my_batches}
        next_i = 0  # index into my_batches of the next batch to yield

        for s, shard_i in enumerate(plan.shard_order):
            lo, hi = int(plan.stream_start[s]), int(plan.stream_start[s + 1])
            if not any(q in wanted for q in range(lo, hi)):
                continue  # none of this worker's samples here: do not open it
            for q, sample in self._read_shard(int(shard_i), lo, wanted):
                b, slot, _ = wanted[q]
                pending[b][slot] = sample
                # yield as soon as the next batch is whole: raw samples held stay ~ the window
                while next_i < len(my_batches) and len(pending[my_batches[next_i]]) == self.local_batch:
                    b = my_batches[next_i]
                    yield self._make_batch(b, pending.pop(b), plan)
                    next_i += 1
        if next_i != len(my_batches):
            raise RuntimeError(
                f"epoch {self.epoch}: {len(my_batches) - next_i} batch(es) incomplete after the "
                "last shard; were shards changed during training?"
            )

    def _read_shard(self, shard_i: int, stream_lo: int, wanted: Container[int]) -> Iterator[tuple[int, RawSample]]:
        """(stream position, sample) of the wanted samples of a shard; the same walk and
        checks as the index, so positions line up."""
        path = self.index.shards[shard_i]
        expected = self.index.keys[shard_i]
        keep = set(expected)
        i = 0
        # Skips were counted when indexing: this pass's tally is not needed.
        for group in iter_samples(path, ReadReport(), read_data=False):
            if group.key not in keep or _usable(group, self.spec) is not None:
                continue
            if i >= len(expected) or expected[i] != group.key:
                raise RuntimeError(f"shard {path} changed since it was indexed (at key {group.key!r})")
            q = stream_lo + i
            i += 1
            if q in wanted:
                image_ext = self.spec.image_ext_of(group.exts)
                assert image_ext is not None  # checked by _usable
                yield q, (group.key, group.read(image_ext), group.read(self.spec.caption_ext), path)
        if i != len(expected):
            raise RuntimeError(f"shard {path} changed since it was indexed ({i} of {len(expected)} samples)")

    def _fetch(self, q: int, plan: _Plan) -> RawSample:
        """The sample at stream position q, by a scan of its shard's headers up to it."""
        s = int(np.searchsorted(plan.stream_start, q, side="right")) - 1
        samples = self._read_shard(int(plan.shard_order[s]), int(plan.stream_start[s]), {q})
        with contextlib.closing(samples):
            return next(samples)[1]

    def _make_batch(self, b: int, items: Mapping[int, RawSample], plan: _Plan) -> Batch:
        images, captions, keys, skips = [], [], [], []
        positions = list(self.batch_positions(b))
        for slot, pos in enumerate(positions):
            key, image_bytes, caption_bytes, shard = items[slot]
            decoded = decode_image(image_bytes)
            if decoded.image is None:
                skips.append([str(shard), key, str(decoded.reason)])  # lists: what a DataLoader worker passes on
                key, image, caption_bytes = self._substitute(pos, plan, skips[-1])
            else:
                image = decoded.image
            # Augmentation randomness tied to the slot, not to the process or worker;
            # the CPU generator alone (torch.manual_seed would also queue CUDA seeding).
            saved = torch.get_rng_state()
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, pos))
            try:
                images.append(self.preprocess(image))
            finally:
                torch.set_rng_state(saved)
            caption = self.spec.caption_from_bytes(caption_bytes)
            captions.append(caption or "")
            keys.append(key)
        return {
            "images": torch.stack(images),
            "texts": self.tokenizer(captions),
            "keys": keys,
            "positions": torch.tensor(positions, dtype=torch.int64),
            "skips": skips,
        }

    def _substitute(self, pos: int, plan: _Plan, bad: Sequence[str]) -> tuple[str, Any, bytes]:
        """(key, image, caption bytes) of the first sample of pos's column after it that
        decodes (see the module doc); bad ones passed over are not counted here."""
        column = range(pos % self.global_batch, self.index.total, self.global_batch)
        at = column.index(pos)
        for j in range(1, len(column)):
            key, image_bytes, caption_bytes, _ = self._fetch(int(plan.order[column[(at + j) % len(column)]]), plan)
            decoded = decode_image(image_bytes)
            if decoded.image is not None:
                return key, decoded.image, caption_bytes
        shard, key, reason = bad
        raise SampleError(
            f"shard {shard}: sample {key!r} ({reason}) cannot be replaced: none of the {len(column)} samples of "
            f"its batch slot's column in epoch {self.epoch} (epoch positions {column.start} + k x {column.step}) "
            "has a decodable image; check the shards' images"
        )


class _TorchStream(IterableDataset):
    """The DataLoader face of a ShardStream: each worker builds its share of the batches."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            yield from self.stream.iter_batches(worker, workers)
        except ModeFastError as e:
            # A worker's exception reaches the trainer as a multi-line traceback dump;
            # handed over as an item instead, it is re-raised there as the one-line error.
            yield {_ERROR: (type(e), str(e))}


_ERROR = "__mode_fast_error__"


def _reraise_errors(batches: Iterable[Batch]) -> Iterator[Batch]:
    for batch in batches:
        if _ERROR in batch:
            error_type, message = batch[_ERROR]
            raise error_type(message)
        yield batch


def _ignore_interrupts(_worker_id: int) -> None:
    """Workers ignore Ctrl-C (it reaches the whole process group): the trainer finishes its
    step, checkpoints, and ends them; a worker that died first would fail the step instead."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Batches of this rank, epoch by epoch, through a torch DataLoader with workers."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterable[Batch]:
        """This rank's batches start_batch, start_batch+1, ... of `epoch`, in order."""
        self.stream.set_position(epoch, start_batch)
        # batch_size=None: workers yield whole batches, handed out round-robin in order.
        # Our own generator: the DataLoader draws worker seeds from it, and drawing them from
        # the global RNG would make the trainer's random state depend on where epochs began.
        generator = torch.Generator().manual_seed(sample_seed(self.stream.seed, epoch, -1))
        return _reraise_errors(
            DataLoader(
                _TorchStream(self.stream),
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=2 if self.num_workers else None,
                pin_memory=self.pin_memory,
                generator=generator,
                worker_init_fn=_ignore_interrupts if self.num_workers else None,
            )
        )
