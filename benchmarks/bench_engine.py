"""Engine benchmark: classifications per second through durable-rules, against the
earlier path and a plain-Python evaluation of the same YAML rule set, measured in the
same run.

    python -m benchmarks.bench_engine                 # 100 000 inputs, 3 rounds, memory over 1 000 000
    python -m benchmarks.bench_engine --quick         # 20 000 inputs, 2 rounds, memory over 100 000

Every measurement runs once per round, the rounds interleaved (so a slower moment of a
shared machine slows every path alike); the best round of each is printed, and every
round of the batched engine. Measured:

* the engine, batched (``classify_many``), as population runs use it: a fresh Engine per
  round (empty lookup tables), then a second pass over the same inputs (tables filled),
  then with every result's trace read (criteria, facts, missing: built on first read);
* the same with ``reuse_firings=True`` (durable-rules asked once per distinct posted fact,
  repeats answered from a table: exact, see engine/lookup.py), fresh and second pass;
* the earlier path (``engine.reference.classify_many_eager``: dict facts checked and
  serialised per fact, every result built at once), the reference it is compared with;
* the engine one at a time (``classify``), as a notification uses it, with p50 / p99;
* the plain-Python evaluation of the same rule set (benchmarks/baseline.py);
* the durable-rules core alone: the three stages' prepared facts asserted, the actions
  read, the sessions deleted, no result objects;
* resident memory before and after the memory run.

Apart from the ``reuse_firings`` lines, every figure fires durable-rules for every input:
the engine reuses what it makes of the rules that fired, never the firing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from importlib.metadata import version

from benchmarks.baseline import evaluate
from benchmarks.generate import feature_sets
from engine.classify import Engine
from engine.reference import classify_many_eager
from engine.ruleset import load_ruleset

TARGET = 25_000
BATCH = 200


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def prepared_core(engine: Engine, inputs) -> list[tuple[list, list, list]]:
    """The facts each stage posts, per batch, made once (for the core-only figure)."""
    out = []
    for start in range(0, len(inputs), BATCH):
        chunk = inputs[start:start + BATCH]
        records = [f.__dict__ for f in chunk]
        tables = engine._tables
        s1 = list(map(tables.stage1_fragment, records))
        after1 = list(map(tables.after_factors, chunk, records, engine._factors.fire_fragments(s1)))
        fired2 = engine._decision.fire_fragments([a.fragment for a in after1])
        after2 = [a.decided.get(r) or tables.after_decision(f, a, r) for f, a, r in zip(chunk, after1, fired2)]
        out.append((s1, [a.fragment for a in after1], [a.fragment for a in after2]))
    return out


def fire_core(engine: Engine, batches) -> None:
    for s1, s2, s3 in batches:
        engine._factors.fire_fragments(s1)
        engine._decision.fire_fragments(s2)
        engine._recommend.fire_fragments(s3)


def read_traces(results) -> None:
    for r in results:
        r.criteria  # builds criteria, facts and missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--memory-n", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.memory_n, args.rounds = 20_000, 100_000, 2
    n = args.n
    ruleset = load_ruleset()
    inputs = feature_sets(n)
    print(f"machine: {os.cpu_count()} cores, CPython {platform.python_version()}, "
          f"durable-rules {version('durable_rules')}; {n} feature sets (every group the generator makes, "
          f"5 % with unknown facts); best of {args.rounds} interleaved rounds")

    core_engine = Engine(ruleset)
    core_batches = prepared_core(core_engine, inputs)
    runs: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "traced", "reuse", "reuse_warm", "eager",
                                                    "core", "plain")}
    groups: dict[str, int] = {}
    for _ in range(args.rounds):
        engine = Engine(ruleset)  # fresh lookup tables: the first pass fills them
        results: list = []
        runs["cold"].append(rate(n, lambda: results.append(engine.classify_many(inputs))))
        if not groups:
            for r in results[0]:
                groups[r.group] = groups.get(r.group, 0) + 1
        results.clear()
        runs["warm"].append(rate(n, lambda: engine.classify_many(inputs)))
        runs["traced"].append(rate(n, lambda: read_traces(engine.classify_many(inputs))))
        reusing = Engine(ruleset, reuse_firings=True)
        runs["reuse"].append(rate(n, lambda: reusing.classify_many(inputs)))
        runs["reuse_warm"].append(rate(n, lambda: reusing.classify_many(inputs)))
        runs["eager"].append(rate(n, lambda: classify_many_eager(engine, inputs)))
        runs["core"].append(rate(n, lambda: fire_core(core_engine, core_batches)))
        runs["plain"].append(rate(n, lambda: [evaluate(ruleset, f) for f in inputs]))
    best = {k: max(v) for k, v in runs.items()}
    print(f"groups: {groups}")

    engine = Engine.default()
    sample = inputs[: min(n, 20_000)]
    engine.classify_many(sample)  # the same lookup tables a long-running receiver has
    times = []
    t0 = time.perf_counter()
    for f in sample:
        t = time.perf_counter_ns()
        engine.classify(f)
        times.append(time.perf_counter_ns() - t)
    single = len(sample) / (time.perf_counter() - t0)
    q = statistics.quantiles(times, n=100)

    cold = best["cold"]
    print(f"durable-rules engine, batched (classify_many), fresh engine: {cold:8.0f} classifications/s "
          f"(rounds: {', '.join(f'{x:.0f}' for x in runs['cold'])})")
    print(f"  same engine, second pass over the inputs:                {best['warm']:8.0f} classifications/s")
    print(f"  same, every result's trace read (criteria, facts, missing): {best['traced']:5.0f} classifications/s")
    print(f"  reuse_firings=True (durable asked once per distinct fact), fresh engine: {best['reuse']:7.0f} "
          f"classifications/s")
    print(f"  reuse_firings=True, second pass (durable not asked again): {best['reuse_warm']:8.0f} classifications/s")
    print(f"earlier path, batched (classify_many_eager):               {best['eager']:8.0f} classifications/s")
    print(f"durable-rules engine, one at a time (classify):            {single:8.0f} classifications/s")
    print(f"plain-Python baseline (same YAML):                         {best['plain']:8.0f} classifications/s")
    print(f"durable-rules core only (3 stages, prepared facts, no results): {best['core']:6.0f} fact sets/s")
    print(f"ratio batched/earlier path {cold / best['eager']:.2f}, batched/core {cold / best['core']:.2f}, "
          f"batched/baseline {cold / best['plain']:.2f}, single/baseline {single / best['plain']:.2f}")
    print(f"single classification latency: p50 {q[49] / 1000:.1f} us, p99 {q[98] / 1000:.1f} us")
    target = f"{TARGET:,}".replace(",", " ")
    print(f"target {target}/s on one core through durable-rules: batched "
          f"{'met' if cold >= TARGET else 'NOT met'} ({cold:.0f}/s, fresh engine, best round); "
          f"with reuse_firings=True {'met' if best['reuse'] >= TARGET else 'NOT met'} ({best['reuse']:.0f}/s)")

    engine.classify_many(inputs)  # warm-up: the allocator's high-water mark for one batch list
    before = rss_mib()
    peak = before
    done = 0
    t = time.perf_counter()
    while done < args.memory_n:
        engine.classify_many(inputs[: min(len(inputs), args.memory_n - done)])
        done += min(len(inputs), args.memory_n - done)
        peak = max(peak, rss_mib())
    after = rss_mib()
    print(f"resident memory: {before:.1f} MiB before, {after:.1f} MiB after {done} classifications "
          f"({after - before:+.1f} MiB, peak {peak:.1f} MiB; {done / (time.perf_counter() - t):.0f}/s)")


if __name__ == "__main__":
    main()
