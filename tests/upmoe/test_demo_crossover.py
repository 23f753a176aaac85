"""upmoe.demo.crossover: where the MoE passes the dense baseline for good (pure; no training)."""

from __future__ import annotations

from upmoe.demo import crossover


def test_crossover_is_the_first_point_from_which_the_moe_stays_ahead():
    dense = [(0, 1.0), (10, 0.8), (20, 0.7), (30, 0.6)]
    assert crossover([(0, 1.5), (10, 0.9), (20, 0.69), (30, 0.59)], dense) == 20
    # Ahead once, then behind again: not a crossover; ahead again at the end is.
    assert crossover([(0, 1.5), (10, 0.7), (20, 0.75), (30, 0.59)], dense) == 30


def test_no_crossover_and_step_zero_does_not_count():
    dense = [(0, 1.0), (10, 0.8), (20, 0.7)]
    assert crossover([(0, 0.9), (10, 0.85), (20, 0.71)], dense) is None
    assert crossover([(0, 0.9), (10, 0.7), (20, 0.6)], dense) == 10
    assert crossover([(0, 0.9), (10, 0.8), (20, 0.7)], dense) is None  # ties are not wins
