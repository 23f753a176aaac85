"""Prometheus metrics of a model replica, through Ray's metrics (scraped from each node's metrics agent).

Besides the usual serving numbers, ``upmoe_expert_tokens`` counts the tokens routed to each expert of each MoE
layer: the routing load real traffic puts on the model, which tells whether expert placement or the EP degree
suits the workload. Per-step expert counts are summed locally and flushed about once a second, because one
counter update per (layer, expert) per step would cost more than the step on a small model.
"""

from __future__ import annotations

import time

import torch

from serve.engine import EngineStats

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
FLUSH_EVERY_S = 1.0


class ReplicaMetrics(EngineStats):
    """``serve.engine.EngineStats`` on ``ray.serve.metrics`` (tagged with application, deployment, replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("upmoe_requests", "Finished generation requests.")
        self.tokens = metrics.Counter("upmoe_generated_tokens", "Tokens generated.")
        self.ttft = metrics.Histogram(
            "upmoe_time_to_first_token_seconds", "Arrival to first token.", boundaries=LATENCY_BUCKETS
        )
        self.tpot = metrics.Histogram(
            "upmoe_time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first.",
            boundaries=LATENCY_BUCKETS,
        )
        self.batch = metrics.Gauge("upmoe_batch_size", "Sequences in the running batch.")
        self.kv_use = metrics.Gauge("upmoe_kv_cache_usage", "Fraction of the KV cache's blocks in use.")
        self.preemptions = metrics.Counter(
            "upmoe_preemptions", "Sequences whose KV blocks were taken back for an older one (recomputed later)."
        )
        self.expert_tokens = metrics.Counter(
            "upmoe_expert_tokens", "Tokens routed to each expert per MoE layer.", tag_keys=("layer", "expert")
        )
        self._pending: torch.Tensor | None = None
        self._flushed_at = time.monotonic()

    def on_step(self, batch_size: int, blocks_used: int, blocks_total: int) -> None:
        self.batch.set(batch_size)
        self.kv_use.set(blocks_used / max(1, blocks_total))
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()

    def on_tokens(self, count: int) -> None:
        self.tokens.inc(count)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, seq_seconds_per_token: float | None) -> None:
        self.requests.inc()
        if seq_seconds_per_token is not None:
            self.tpot.observe(seq_seconds_per_token)

    def on_preempt(self) -> None:
        self.preemptions.inc()

    def on_expert_counts(self, counts_LE: torch.Tensor) -> None:
        self._pending = counts_LE.clone() if self._pending is None else self._pending + counts_LE

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        for layer, row in enumerate(pending.tolist()):
            for expert, count in enumerate(row):
                if count:
                    self.expert_tokens.inc(count, tags={"layer": str(layer), "expert": str(expert)})
