"""Synthetic inputs for the benchmarks and the differential test (seeded, reproducible)."""

from __future__ import annotations

import random
from decimal import Decimal

from engine.features import Fact, Features

BOUNDARY_SIZES = ("49.9", "50", "50.0", "49.999", "50.001", "5", "120", "0.5")


def random_features(rng: random.Random, unknown_share: float = 0.05) -> Features:
    """Every group appears; ``unknown_share`` of the inputs have unknown facts."""
    unknown = rng.random() < unknown_share

    def maybe(value):
        return None if unknown and rng.random() < 0.5 else value

    size = Decimal(rng.choice(BOUNDARY_SIZES)) if rng.random() < 0.2 else Decimal(rng.randint(5, 900)) / 10
    return Features(
        patient=f"Patient/bench-{rng.randrange(10**9)}",
        liver_recurrence=Fact[bool](value=maybe(rng.random() < 0.97)),
        tumour_count=Fact[int](value=maybe(rng.choice((1, 1, 2, 3, 3, 4, 4, 5, 8))), lower_bound=rng.random() < 0.03),
        largest_diameter_mm=Fact(value=maybe(size), lower_bound=rng.random() < 0.03),
        extrahepatic_disease=Fact[bool](value=maybe(rng.random() < 0.25)),
        technical_resectability=Fact(value=rng.choice((None, None, "resectable", "unresectable"))),
        adjuvant_chemotherapy=Fact[bool](value=rng.choice((None, True, False))),
    )


def feature_sets(n: int, seed: int = 20241125, unknown_share: float = 0.05) -> list[Features]:
    rng = random.Random(seed)
    return [random_features(rng, unknown_share) for _ in range(n)]
