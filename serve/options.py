"""Everything ``upmoe serve`` can be told, as one typed config: defaults, YAML file, then flags."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

API_KEY_ENV = "UPMOE_API_KEY"


@dataclass(kw_only=True)
class ServeOptions:
    model_dir: str
    ep: int = 1
    gpus_per_rank: int = 0
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    max_batch_size: int = 16
    max_num_batched_tokens: int = 2048
    max_seq_len: int | None = None  # None: the model's context length
    kv_cache_gib: float | None = None  # None: serve.kv_sizing.default_kv_cache_bytes
    max_queued_requests: int = 64
    max_request_bytes: int | None = None  # None: from the context (serve.edge.request_byte_limit)
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # None: the model directory's name
    ray_address: str | None = None

    def __post_init__(self) -> None:
        self.model_dir = str(Path(self.model_dir).expanduser().resolve())
        if self.model_name is None:
            self.model_name = Path(self.model_dir).name
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.ep >= 1, f"--ep must be at least 1, got {self.ep}")
        need(self.gpus_per_rank in (0, 1), f"--gpus-per-rank must be 0 or 1, got {self.gpus_per_rank}")
        need(1 <= self.min_replicas <= self.max_replicas, "need 1 <= --min-replicas <= --max-replicas")
        need(self.target_ongoing_requests > 0, "--target-ongoing-requests must be positive")
        need(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0, "autoscaling delays must be >= 0")
        need(self.max_batch_size >= 1, f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        need(self.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be at least 1")
        need(self.max_seq_len is None or self.max_seq_len >= 2, "--max-seq-len must be at least 2")
        need(self.kv_cache_gib is None or self.kv_cache_gib > 0, "--kv-cache-gib must be positive")
        need(self.max_queued_requests >= 1, "--max-queued-requests must be at least 1")
        need(self.max_request_bytes is None or self.max_request_bytes >= 1, "--max-request-bytes must be positive")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"unknown --dtype {self.dtype!r}")
        need(1 <= self.port <= 65535, f"--port {self.port} is not a TCP port")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_serve_options(yaml_path: str | Path | None, overrides: dict[str, Any]) -> ServeOptions:
    """Defaults, then the YAML file's values, then every override that is not None."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of option names to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ServeOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown serve option(s): {', '.join(unknown)}")
    if "model_dir" not in values:
        raise ValueError("missing MODEL_DIR")
    opts = ServeOptions(**values)
    opts.validate()
    return opts
