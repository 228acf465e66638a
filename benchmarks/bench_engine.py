"""Engine benchmark: classifications per second through durable-rules, against a
plain-Python evaluation of the same YAML rule set, measured in the same run.

    python -m benchmarks.bench_engine                 # 100 000 inputs, memory over 1 000 000
    python -m benchmarks.bench_engine --quick         # 20 000 inputs, memory over 100 000

Prints: classifications/s for the engine (batched, as population runs use it, and
one at a time, as a notification uses it) and for the baseline, the ratios, p50 / p99
per single classification, and resident memory before and after the memory run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.baseline import evaluate
from benchmarks.generate import feature_sets
from engine.classify import Engine


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--memory-n", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.memory_n = 20_000, 100_000
    engine = Engine.default()
    inputs = feature_sets(args.n)
    groups = {}
    print(f"machine: {os.cpu_count()} cores; {args.n} feature sets (every group, 5 % with unknown facts)")

    t = time.perf_counter()
    results = engine.classify_many(inputs)
    batched = args.n / (time.perf_counter() - t)
    for r in results:
        groups[r.group] = groups.get(r.group, 0) + 1
    print(f"groups: {groups}")
    del results  # 100 000 results with their traces would dominate the memory figures below

    sample = inputs[: min(args.n, 20_000)]
    times = []
    t0 = time.perf_counter()
    for f in sample:
        t = time.perf_counter_ns()
        engine.classify(f)
        times.append(time.perf_counter_ns() - t)
    single = len(sample) / (time.perf_counter() - t0)

    t = time.perf_counter()
    for f in inputs:
        evaluate(engine.ruleset, f)
    baseline = args.n / (time.perf_counter() - t)

    # The durable-rules core alone: the three staged fire_many calls, no result building.
    from engine.compile import DECIDED_KIND
    stage1 = [engine.features_fact(f) for f in inputs]
    engine._factors.fire_many(stage1[:1])  # warm
    t = time.perf_counter()
    for start in range(0, args.n, 200):
        chunk = inputs[start:start + 200]
        fired = engine._factors.fire_many(stage1[start:start + 200])
        states = [engine._states(f, r) for f, r in zip(chunk, fired)]
        decided = engine._decision.fire_many(states)
        groups_ = [engine._groups[engine._one(r, "group.", "group", f)].id for f, r in zip(chunk, decided)]
        engine._recommend.fire_many([{**st, "kind": DECIDED_KIND, "group": g} for st, g in zip(states, groups_)])
    core = args.n / (time.perf_counter() - t)

    q = statistics.quantiles(times, n=100)
    print(f"durable-rules engine, batched (classify_many): {batched:10.0f} classifications/s")
    print(f"durable-rules engine, one at a time (classify): {single:9.0f} classifications/s")
    print(f"plain-Python baseline (same YAML):             {baseline:10.0f} classifications/s")
    print(f"durable-rules core only (3 stages, no result objects): {core:7.0f} fact sets/s")
    print(f"ratio engine/baseline: batched {batched / baseline:.2f}, single {single / baseline:.2f}")
    print(f"single classification latency: p50 {q[49] / 1000:.1f} us, p99 {q[98] / 1000:.1f} us")
    print(f"target 25 000/s on one core: batched {'met' if batched >= 25_000 else 'NOT met'}")

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
