"""Exact and semantic deduplication of a pool (`mode-fast dedup`).

`exact`: a hash of each record's image bytes (or normalised caption and image bytes); the
first record of a hash in pool order is kept. `semantic`: SemDeDup (Abbas et al., 2023;
facebookresearch/SemDeDup) on caption or image embeddings: k-means, items ordered inside
each cluster by their cosine distance to its center, and for every item the most similar
item before it (`mode_fast.kernels.semdedup.max_earlier_similarity`); an item is removed at
eps when that similarity exceeds 1 - eps. The job (`mode_fast.dedup.run`) writes, per eps,
the kept keys (curate's format), the duplicate chains and a summary (docs/dedup.md).
"""
