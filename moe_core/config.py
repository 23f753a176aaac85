"""One typed configuration for Qwen2 dense and Qwen2-MoE models, read from and written to HF config.json.

Real checkpoints come from two generations of transformers:
- v4 writes ``rope_theta`` and ``rope_scaling`` at the top level;
- v5 writes ``rope_parameters`` (with ``rope_theta`` inside) and ``layer_types``.
Both are read. A config read from disk is written back in the style it came in, with every key we do not
model kept verbatim in ``extra``. New configs are written in the v4 style, because transformers v5 and vLLM
read it while transformers v4 would silently ignore ``rope_parameters`` and fall back to rope_theta=1e4.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that upmoe cannot use, with the file and key that is wrong."""


class ModelType(str, Enum):
    DENSE = "qwen2"
    MOE = "qwen2_moe"


# Source architectures that share Qwen2's layer structure (upcycling reads them; they have no QKV bias).
DENSE_COMPATIBLE_TYPES = ("qwen2", "llama", "mistral")

_ARCHITECTURES = {ModelType.DENSE: "Qwen2ForCausalLM", ModelType.MOE: "Qwen2MoeForCausalLM"}
_ROPE_FORMATS = ("v4", "v5")


@dataclass(kw_only=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Qwen2 / Qwen2-MoE causal LM (names follow HF config.json)."""

    model_type: ModelType = ModelType.DENSE
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    # Normalised rope scaling dict (always has "rope_type"), or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # MoE fields (used when model_type is qwen2_moe).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Bookkeeping for exact round trips.
    rope_format: str = "v4"
    # The rope scaling dict verbatim as read (v4 rope_scaling / v5 rope_parameters less rope_theta), written back
    # unchanged when the normalised scaling was not modified, so legacy spellings round-trip exactly.
    rope_scaling_as_read: dict[str, Any] | None = None
    rope_format_as_read: str | None = None
    # Known keys the source file did not have: left out again when still null, so files round-trip exactly.
    absent_keys: frozenset[str] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_type = ModelType(self.model_type)
        self.validate()

    # ------------------------------------------------------------------ derived shapes
    @property
    def is_moe(self) -> bool:
        return self.model_type is ModelType.MOE

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has QKV bias; v5 Qwen2-MoE configs spell it out as ``qkv_bias`` (kept in extra)."""
        return bool(self.extra.get("qkv_bias", True))

    @property
    def num_shared_experts(self) -> int:
        """Shared experts fused into one MLP, counted in units of the routed expert size."""
        if not self.is_moe or not self.moe_intermediate_size:
            return 0
        return self.shared_expert_intermediate_size // self.moe_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen2-MoE's rule: sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
        return (
            self.is_moe
            and self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_key_value_heads > 0, "num_key_value_heads must be positive")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})",
        )
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        need(not self.use_sliding_window, "use_sliding_window=true is not supported by upmoe")
        need(self.rope_format in _ROPE_FORMATS, f"rope_format must be one of {_ROPE_FORMATS}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            need(kind in ("default", "linear", "yarn"), f"rope scaling type {kind!r} is not supported")
        if self.is_moe:
            need(self.num_experts > 0, f"num_experts must be positive for qwen2_moe, got {self.num_experts}")
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), got {self.num_experts_per_tok}",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            need(self.decoder_sparse_step > 0, "decoder_sparse_step must be positive")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Parse a config.json dict (v4 or v5 style). ``source`` names the file in error messages."""
        cfg = copy.deepcopy(raw)
        model_type = cfg.pop("model_type", None)
        if model_type not in (ModelType.DENSE.value, ModelType.MOE.value):
            raise ConfigError(f"{source}: unsupported model_type {model_type!r}; expected 'qwen2' or 'qwen2_moe'")
        rope_theta, rope_scaling, rope_format, as_read = _read_rope(cfg, source)
        known = {f.name for f in fields(cls)} - _BOOKKEEPING
        kwargs: dict[str, Any] = {k: cfg.pop(k) for k in list(cfg) if k in known}
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 0)
        if kwargs.get("mlp_only_layers") is None:
            kwargs.pop("mlp_only_layers", None)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if name not in kwargs:
                raise ConfigError(f"{source}: missing required key {name!r}")
        try:
            return cls(
                model_type=ModelType(model_type),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                rope_format=rope_format,
                rope_scaling_as_read=as_read,
                rope_format_as_read=rope_format,
                absent_keys=frozenset({f.name for f in fields(cls)} - _BOOKKEEPING - set(raw))
                | (frozenset() if "rope_scaling" in raw else frozenset({"rope_scaling"})),
                extra=cfg,
                **kwargs,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dict: unknown keys kept, known keys written in this config's rope style."""
        out = copy.deepcopy(self.extra)
        out["model_type"] = self.model_type.value
        # vLLM picks the model class from "architectures", so it must match model_type.
        if out.get("architectures") in (None, *([a] for a in _ARCHITECTURES.values())):
            out["architectures"] = [_ARCHITECTURES[self.model_type]]
        skip = _BOOKKEEPING | {"head_dim"}
        skip |= set() if self.is_moe else {f.name for f in fields(self) if f.name in _MOE_FIELDS}
        if self.max_window_layers is None:
            skip.add("max_window_layers")  # transformers v5 refuses null here
        for f in fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, list) else value
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.rope_format == "v5":
            as_read = self.rope_scaling_as_read if self.rope_format == self.rope_format_as_read else None
            if as_read is not None and _normalise_scaling(as_read) == self.rope_scaling:
                params = copy.deepcopy(as_read)
            else:
                params = dict(self.rope_scaling or {"rope_type": "default"})
            out["rope_parameters"] = {**params, "rope_theta": self.rope_theta}
            out.setdefault("layer_types", ["full_attention"] * self.num_hidden_layers)
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = self._v4_rope_scaling()
        for key in self.absent_keys:
            if out.get(key, 0) is None:
                del out[key]
        return out

    def _v4_rope_scaling(self) -> dict[str, Any] | None:
        as_read = self.rope_scaling_as_read if self.rope_format == self.rope_format_as_read else None
        if as_read is not None and _normalise_scaling(as_read) == self.rope_scaling:
            return copy.deepcopy(as_read)
        if self.rope_scaling is None:
            return None
        # Both spellings: transformers < 4.45 reads "type", later versions "rope_type".
        return {"type": self.rope_scaling["rope_type"], **self.rope_scaling}

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n"


_BOOKKEEPING = {
    "model_type",
    "rope_theta",
    "rope_scaling",
    "rope_format",
    "rope_scaling_as_read",
    "rope_format_as_read",
    "absent_keys",
    "extra",
}
_MOE_FIELDS = {
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "decoder_sparse_step",
    "mlp_only_layers",
}


def _normalise_scaling(scaling: dict[str, Any]) -> dict[str, Any] | None:
    body = dict(scaling)
    kind = body.pop("rope_type", None) or body.pop("type", None) or "default"
    body.pop("type", None)
    return None if kind == "default" else {"rope_type": kind, **body}


def _read_rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None, str, dict[str, Any] | None]:
    """Pop the rope keys of either generation; return (theta, normalised scaling, format, v4 verbatim)."""
    params = cfg.pop("rope_parameters", None)
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError(f"{source}: rope_parameters must be a dict holding rope_theta, got {params!r}")
        params = dict(params)
        theta = float(params.pop("rope_theta"))
        # A v5 file may also carry a stale top-level rope_theta/rope_scaling; rope_parameters wins.
        cfg.pop("rope_theta", None)
        cfg.pop("rope_scaling", None)
        return theta, _normalise_scaling(params), "v5", params
    theta = float(cfg.pop("rope_theta", 10000.0))
    as_read = cfg.pop("rope_scaling", None)
    if as_read is None:
        return theta, None, "v4", None
    if not isinstance(as_read, dict):
        raise ConfigError(f"{source}: rope_scaling must be a dict or null, got {as_read!r}")
    return theta, _normalise_scaling(as_read), "v4", copy.deepcopy(as_read)


def llama_as_qwen2(raw: dict[str, Any], where: str) -> ModelConfig:
    """A dense ``llama`` / ``mistral`` config as the Qwen2-shaped config it is, minus the QKV bias.

    Both share Qwen2's layer structure (RMSNorm, GQA attention, SwiGLU MLP, rotate-half RoPE). The result
    carries ``qkv_bias: false`` and ``converted_from`` in ``extra``; it can be read and run, never saved as is.
    """
    arch = raw.get("model_type")
    if raw.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported (Qwen2 MLPs are bias-free)")
    if raw.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true gives o_proj a bias, which Qwen2 does not have")
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (default, linear or yarn)")
    as_qwen2 = {k: v for k, v in raw.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    as_qwen2.update(model_type="qwen2", qkv_bias=False, converted_from=arch)
    as_qwen2.pop("use_sliding_window", None)  # mistral's window is informational here: no sliding attention
    return ModelConfig.from_hf_dict(as_qwen2, source=where)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Like ``load_config`` but also reads dense ``llama`` / ``mistral`` directories (as Qwen2 without bias)."""
    path = Path(model_dir)
    path = path / "config.json" if path.is_dir() else path
    raw = _read_json_object(path)
    if raw.get("model_type") in ("llama", "mistral"):
        return llama_as_qwen2(raw, str(path))
    return ModelConfig.from_hf_dict(raw, source=str(path))


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"missing config.json: {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read MODEL_DIR/config.json (or a config.json path) with errors that name the file."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    return ModelConfig.from_hf_dict(_read_json_object(path), source=str(path))


def save_config(config: ModelConfig, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "config.json"
    path.write_text(config.to_json())
    return path
