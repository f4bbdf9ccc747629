"""The CLIP models mode-fast trains: open_clip architectures by name, plus this project's
own configs (`model_configs/*.json`: mode-fast-tiny, mode-fast-small, which train on a CPU).

Library module: `register_model_configs` makes the project's configs known to open_clip,
`create_model` builds a model with its training transform and tokenizer, `get_tokenizer` is
the one tokenizer every job uses (open_clip's, on a bounded prefix of each caption: a
caption costs time and memory in proportion to the tokens kept, not to its length).
Checkpoints are in `mode_fast.training.checkpoint`. Never imports a job module.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mode_fast.core.errors import ConfigError, InputError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_registered = False


def register_model_configs() -> None:
    """Make this project's configs (mode-fast-tiny, ...) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def project_model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def is_known_model(name: object) -> bool:
    """Whether `name` is an architecture in open_clip's registry (with this project's configs):
    a plain name, no 'hf-hub:'/'local-dir:' source that picks files to load."""
    import open_clip

    register_model_configs()
    return isinstance(name, str) and name in open_clip.list_models()


# The constructor kwargs `model_kwargs` can return (all floats): the only ones a checkpoint
# may carry (`mode_fast.training.checkpoint` refuses any other, since open_clip's loaders take kwargs
# that read files).
STORED_MODEL_KWARGS = frozenset({"init_logit_scale", "init_logit_bias"})


def model_kwargs(siglip: bool) -> dict[str, Any]:
    """Constructor arguments beyond the architecture: open_clip's SigLIP init for a sigmoid loss."""
    return {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0} if siglip else {}


@dataclass
class CreatedModel:
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    kwargs: dict[str, Any] = field(default_factory=dict)  # stored in checkpoints to rebuild it


def create_model(
    name: str,
    device: str | torch.device = "cpu",
    siglip: bool = False,
    patch_dropout: float | None = None,
    output_dict: bool = True,
) -> CreatedModel:
    """A freshly initialised open_clip model (draws from torch's global RNG: seed first)."""
    import open_clip

    register_model_configs()
    kwargs = model_kwargs(siglip)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, device=device, output_dict=output_dict,
        force_patch_dropout=patch_dropout, **kwargs,
    )  # fmt: skip
    return CreatedModel(model, preprocess_train, preprocess_val, get_tokenizer(name), kwargs)


# --- the bounded tokenizer ------------------------------------------------------------------------

# A caption with more than this many characters per context position (not counting
# whitespace) is cut before it is tokenized. A CLIP BPE token is about 4-5 characters of
# English, so the first cut of a caption that needs cutting nearly always fills the context.
CUT_CHARS_PER_TOKEN = 16
# Lines of nothing but ASCII spaces and tabs: ftfy leaves them as they are and open_clip's
# whitespace cleaning then drops them, so they are dropped first (exact, and it spares ftfy
# a Python call per line of a caption that is mostly newlines).
_BLANK_LINES = re.compile(r"\n[ \t\n]*\n")


# Characters that make no token of their own (whitespace, control characters) do not count
# towards a cut's length, so the first cut of a caption nearly always holds enough text.
_NO_TOKEN = r"[\s\x00-\x1f\x7f-\x9f]"


@functools.lru_cache(maxsize=64)
def _content_chars(n: int) -> re.Pattern[str]:
    """Matches a text up to its n-th character that is not _NO_TOKEN."""
    return re.compile(f"(?:{_NO_TOKEN}*[^{_NO_TOKEN[1:-1]}]){{{n}}}")


def get_tokenizer(name: str) -> BoundedTokenizer:
    """open_clip's tokenizer for model `name`, cutting long captions first (`BoundedTokenizer`):
    the one tokenizer of training (`create_model`) and eval (`checkpoint.load_model`)."""
    import open_clip

    register_model_configs()
    return BoundedTokenizer(open_clip.get_tokenizer(name))


class BoundedTokenizer:
    """open_clip's tokenizer on a bounded prefix of each caption; the same token ids.

    open_clip cleans and encodes a whole caption (ftfy, HTML unescaping, whitespace, BPE),
    then keeps its first ``context_length - 2`` tokens: a 20 MB caption costs seconds and
    hundreds of MB for 77 ids. Here a caption with more than ``CUT_CHARS_PER_TOKEN *
    context_length`` characters other than whitespace and control characters is cut
    just before the last ASCII space, tab or newline by then, and the cut is used only if
    its own tokens fill the context (a re-check with the tokenizer's ``encode``); else a
    cut four times longer is tried, up to the whole caption. Lines of only spaces and tabs
    are dropped (exact: `_BLANK_LINES`). Shorter captions are passed through untouched.

    The ids equal open_clip's for every caption that is not cut, and for one that is,
    because each step of open_clip's cleaning and encoding turns the text before such a
    whitespace into a prefix of what it makes of the whole (HTML entities, words and BPE
    tokens never span an ASCII space, tab or newline; NFC and lower-casing do not act
    across one), except in two cases:

    - ftfy re-decodes mojibake (text decoded with the wrong encoding) by looking at a
      whole line (up to 1M characters): a line that holds the cut and that ftfy would fix
      differently as a whole than up to the cut can give other ids;
    - a cut with no ASCII space, tab or newline in the ``CUT_CHARS_PER_TOKEN *
      context_length`` characters before it (one huge "word", or a long text in a script
      written without spaces) is made inside that word: the word's last tokens, and in
      principle BPE merges before them, can differ. (open_clip itself spends time
      quadratic in a word's length on such a caption.)

    ftfy skips HTML unescaping in a line that holds a "<": when the line holds one only
    after the cut, the cut gets " <" appended, so that it is cleaned the same way (one
    more token, past those kept). What is still read whole: the whitespace within lines
    before the cut (a caption of 20 MB of spaces costs what open_clip's does, under a
    second; one of non-ASCII whitespace several seconds, as in open_clip).

    Other tokenizers than open_clip's CLIP BPE, ``SimpleTokenizer`` without a reduction
    mode (every project config, the OpenAI and LAION CLIP models), have no ``encode`` to
    re-check with: their captions are cut once, at four times the first cut's length, and
    differ from uncut ones only if the context's tokens need more text than that.
    """

    def __init__(self, tokenizer: Any) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.tokenizer = tokenizer
        self.context_length: int = tokenizer.context_length
        self.exact = isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None

    def __getattr__(self, name: str) -> Any:
        # The wrapped tokenizer's other attributes (vocab_size, sot_token_id, ...); not
        # while unpickling (a DataLoader worker), before `tokenizer` is set.
        if name.startswith("__") or "tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        context_length = context_length or self.context_length
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer([self.bounded(t, context_length) for t in texts], context_length=context_length)

    def bounded(self, text: str, context_length: int) -> str:
        """What is tokenized in place of `text`: itself, or a prefix that gives its ids."""
        size = CUT_CHARS_PER_TOKEN * context_length
        if len(text) <= size:
            return text
        if not self.exact:
            return _cut(text, 4 * size)[0]
        while True:
            cut, extra, whole = _cut(text, size)
            if whole or len(self.tokenizer.encode(cut)) >= context_length - 2 + extra:
                return cut
            size *= 4


def _cut(text: str, size: int) -> tuple[str, int, bool]:
    """(the text cut after `size` characters other than _NO_TOKEN, as
    `BoundedTokenizer` says; tokens appended after the cut (1 for " <", else 0); whether
    it is the whole text)."""
    match = _content_chars(size).match(text)
    if match is None:  # fewer such characters: the whole text
        return _BLANK_LINES.sub("\n", text), 0, True
    limit = match.end()
    at = max(text.rfind(c, 0, limit + 1) for c in " \t\n")
    if at <= limit - size:  # no whitespace near: cut inside the word
        at = limit
    import ftfy

    # ftfy fixes a text a line at a time, a line split every max_decode_length characters,
    # and skips HTML unescaping from the first such segment that holds a "<" on.
    segment = ftfy.TextFixerConfig().max_decode_length
    line = text.rfind("\n", 0, at) + 1
    start = line + (at - line) // segment * segment
    newline = text.find("\n", at)
    end = min(len(text) if newline < 0 else newline + 1, start + segment)
    extra = int(text.find("<", at, end) >= 0 and text.find("<", start, at) < 0)
    return _BLANK_LINES.sub("\n", text[:at]) + " <" * extra, extra, False


# --- pretrained tags, from the local cache only ------------------------------------------------


def pretrained_tags(name: str) -> list[str]:
    """The pretrained tags open_clip's registry lists for architecture `name`."""
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(name))


def cached_pretrained_file(name: str, tag: str, cache_dir: str | Path | None = None) -> Path:
    """The local file open_clip would load for `name` with pretrained tag `tag`, found in the
    cache only: nothing is downloaded (mode-fast runs offline). open_clip's own order:
    a Hugging Face hub entry ("hf_hub": repo/file, its .safetensors twin first) in the hub
    cache (`cache_dir`, else huggingface_hub's default: $HF_HUB_CACHE or ~/.cache/huggingface/hub),
    then a URL entry as open_clip stores it (`cache_dir`, else ~/.cache/clip, the URL's file
    name). InputError naming the tag and every path looked in when none is there; ConfigError
    when the registry has no such tag for `name`, or the tag's weights need another
    architecture (QuickGELU: open_clip's `-quickgelu` names)."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME

    register_model_configs()
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = pretrained_tags(name)
        raise ConfigError(
            f"{name}:{tag}: open_clip's registry has no pretrained tag {tag!r} for {name} "
            f"(its tags: {', '.join(tags) if tags else 'none'}); a local file needs a path, e.g. {name}:./weights.pt"
        )
    if cfg.get("quick_gelu") and not name.endswith("-quickgelu"):
        raise ConfigError(
            f"{name}:{tag}: these weights were trained with QuickGELU: use {name}-quickgelu:{tag} (open_clip's name)"
        )
    looked: list[str] = []
    if cfg.get("file"):  # an entry that names a local file itself
        looked.append(str(cfg["file"]))
        if Path(cfg["file"]).is_file():
            return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, _, filename = hub.rpartition("/")  # "org/name/" names the default file (open_clip's rule)
        filename = filename or HF_WEIGHTS_NAME
        names = [*_safe_alternatives(filename), filename]
        root = Path(cache_dir) if cache_dir else hub_cache()
        for n in names:
            found = try_to_load_from_cache(repo, n, cache_dir=root)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
            looked.append(str(root / ("models--" + repo.replace("/", "--")) / "snapshots" / "*" / n))
    if cfg.get("url"):
        target = (Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()) / Path(cfg["url"]).name
        if target.is_file():
            return target
        looked.append(str(target))
    raise InputError(
        f"pretrained {name}:{tag} is not in the local cache (looked in {', '.join(looked)}); mode-fast does not "
        "download: fetch it once with open_clip.create_model(name, pretrained=tag) where a network is, "
        "or give the file (ARCH:PATH)"
    )


def hub_cache() -> Path:
    """huggingface_hub's cache folder, by its rule, read now (its constant is fixed at import):
    $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _safe_alternatives(filename: str) -> list[str]:
    """open_clip's .safetensors twins of a hub file name (`pretrained._get_safe_alternatives`)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []
