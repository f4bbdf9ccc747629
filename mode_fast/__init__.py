"""mode-fast: MetaCLIP curation and MoDE data experts for CLIP, with native hot paths."""

__version__ = "0.1.0"
