"""Matcher benchmarks: mode-fast's C++ matcher against pyahocorasick, same semantics, same run.

Run:  .venv/bin/python -m pytest benchmarks/bench_matcher.py \
          --benchmark-json benchmarks/results/cpu/matcher.json
then: .venv/bin/python benchmarks/report.py benchmarks/results/cpu/matcher.json
(`make bench` does both). Sizes: MATCHER_BENCH_ENTRIES (default 500k), MATCHER_BENCH_TEXTS.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from matcher_corpus import make_captions, make_entries

ahocorasick = pytest.importorskip("ahocorasick")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from matching_reference import AhoCorasickMatcher  # noqa: E402

from mode_fast._matcher import Matcher  # noqa: E402

N_ENTRIES = int(os.environ.get("MATCHER_BENCH_ENTRIES", 500_000))
N_TEXTS = int(os.environ.get("MATCHER_BENCH_TEXTS", 50_000))


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    entries = make_entries(N_ENTRIES)
    texts = make_captions(entries, N_TEXTS, seed=1)
    return entries, texts


@pytest.fixture(scope="module")
def matchers(corpus):
    entries, texts = corpus
    m, ac = Matcher(entries), AhoCorasickMatcher(entries)
    # Same semantics or the race means nothing.
    for text in texts[:2000]:
        assert m.match(text) == ac.match(text)
    return m, ac


def _info(benchmark, corpus, **extra) -> None:
    entries, texts = corpus
    benchmark.extra_info.update(
        entries=len(entries), texts=len(texts),
        mean_text_bytes=sum(len(t.encode()) for t in texts) / len(texts), **extra,
    )


@pytest.mark.benchmark(group="match 1 thread")
def test_match_pyahocorasick(benchmark, corpus, matchers):
    _, ac = matchers
    _info(benchmark, corpus, provider="pyahocorasick", baseline=True)
    texts = corpus[1]
    benchmark.pedantic(lambda: [ac.match(t) for t in texts], rounds=3, iterations=1)


@pytest.mark.benchmark(group="match 1 thread")
def test_match_batch_1_thread(benchmark, corpus, matchers):
    m, _ = matchers
    _info(benchmark, corpus, provider="mode-fast match_batch(threads=1)")
    benchmark.pedantic(m.match_batch, args=(corpus[1],), kwargs={"threads": 1}, rounds=10, iterations=1)


@pytest.mark.benchmark(group="match 1 thread")
def test_match_per_text_loop(benchmark, corpus, matchers):
    # A Python loop of single calls, as pyahocorasick is used: includes call overhead.
    m, _ = matchers
    _info(benchmark, corpus, provider="mode-fast match() loop")
    texts = corpus[1]
    benchmark.pedantic(lambda: [m.match(t) for t in texts], rounds=5, iterations=1)


@pytest.mark.benchmark(group="match_batch threads")
def test_match_batch_threads_1(benchmark, corpus, matchers):
    m, _ = matchers
    _info(benchmark, corpus, provider="threads=1", baseline=True)
    benchmark.pedantic(m.match_batch, args=(corpus[1] * 4,), kwargs={"threads": 1}, rounds=10, iterations=1)


@pytest.mark.benchmark(group="match_batch threads")
def test_match_batch_threads_2(benchmark, corpus, matchers):
    m, _ = matchers
    _info(benchmark, corpus, provider="threads=2", cores=os.cpu_count())
    benchmark.pedantic(m.match_batch, args=(corpus[1] * 4,), kwargs={"threads": 2}, rounds=10, iterations=1)


# Build time and memory are measured in a fresh interpreter so the peak RSS belongs
# to the build alone: the entry list is made first, then the kernel's peak-RSS mark is
# reset (clear_refs 5) and the build's peak is read back as VmHWM minus the start.
_BUILD_SCRIPT = r"""
import gc, json, sys, time
sys.path[:0] = {paths!r}
from matcher_corpus import make_entries
entries = make_entries({n})
gc.collect()
from proc_memory import reset_peak, status_mb
reset_peak()
before = status_mb("VmRSS")
start = time.perf_counter()
if {provider!r} == "mode-fast":
    from mode_fast._matcher import Matcher
    m = Matcher(entries)
else:
    from matching_reference import AhoCorasickMatcher
    m = AhoCorasickMatcher(entries)
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "peak_mb_over_entries": status_mb("VmHWM") - before,
                  "rss_after_mb": status_mb("VmRSS") - before}}))
"""


@pytest.mark.parametrize("provider", ["pyahocorasick", "mode-fast"])
@pytest.mark.benchmark(group="build")
def test_build(benchmark, provider):
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, os.path.join(here, "..", "tests")]
    script = _BUILD_SCRIPT.format(paths=paths, n=N_ENTRIES, provider=provider)
    results = []

    def run():
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout))

    benchmark.pedantic(run, rounds=3, iterations=1)
    best = min(results, key=lambda r: r["seconds"])
    benchmark.extra_info.update(
        provider=provider, entries=N_ENTRIES, baseline=provider == "pyahocorasick",
        build_seconds=best["seconds"], build_peak_mb=max(r["peak_mb_over_entries"] for r in results),
        resident_mb=best["rss_after_mb"],
    )
