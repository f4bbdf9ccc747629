"""The substring matcher: the native core (csrc/, `mode_fast._matcher`) under its public name.

``Matcher(entries)`` builds an Aho-Corasick automaton over metadata entries; ``match`` and
``match_batch`` return the entry ids found in texts (the GIL released while matching), with
MetaCLIP's semantics (metaclip1: whole-word, case-folded; metaclip2: per-language rules).
The signatures are in ``mode_fast/_matcher.pyi``.
"""

from mode_fast._matcher import FILE_FORMAT, Matcher, hash_keys

__all__ = ["FILE_FORMAT", "Matcher", "hash_keys"]
