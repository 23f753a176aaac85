"""What one upcycling task computes and writes: the embeddings shard, or the shard of a group of layers.

A task opens the source lazily (mmap'd safetensors), reads only the tensors its layers need, converts them
and writes its own shard under its final name, then reports size, checksum and per-layer checks. Peak
memory is about one dense layer plus one MoE layer (computed in fp32).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_core.checkpoint_io import TensorReader, write_safetensors_file
from moe_core.config import ModelConfig
from moe_core.state_dict_adapter import expert_tensors
from upcycle.recipe import InitMethod, UpcycledFFN, UpcycleSpec, layer_generator, upcycle_ffn

CHECKED_EXPERTS = 8  # routed experts per layer whose kept neurons are compared with the dense FFN


@dataclass(frozen=True)
class Task:
    index: int
    file: str  # final shard name
    layers: tuple[int, ...]  # empty for the embeddings task

    @property
    def label(self) -> str:
        if not self.layers:
            return "embeddings"
        return f"layers {self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else f"layer {self.layers[0]}"


@dataclass
class ShardResult:
    file: str
    keys: list[str]
    bytes: int  # file size
    sha256: str
    seconds: float
    checks: dict[str, Any] = field(default_factory=dict)


def plan_tasks(num_layers: int, layers_per_task: int) -> list[Task]:
    from moe_core.checkpoint_io import shard_name

    groups = [tuple(range(i, min(i + layers_per_task, num_layers))) for i in range(0, num_layers, layers_per_task)]
    n = len(groups) + 1
    return [Task(0, shard_name(0, n), ())] + [Task(k + 1, shard_name(k + 1, n), g) for k, g in enumerate(groups)]


def _fresh(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def embedding_tensors(
    reader: TensorReader | None, src: ModelConfig, tgt: ModelConfig, spec: UpcycleSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Embeddings, final norm and lm_head; the vocabulary sliced (or zero-padded) to the target size."""
    gen = layer_generator(spec.seed, -1, "embeddings")
    names = ["model.embed_tokens.weight"] + ([] if tgt.tie_word_embeddings else ["lm_head.weight"])
    for name in names:
        if spec.init is InitMethod.RANDOM:
            yield name, _fresh((tgt.vocab_size, tgt.hidden_size), spec.init_std, gen)
            continue
        source_name = name if (name != "lm_head.weight" or not src.tie_word_embeddings) else "model.embed_tokens.weight"
        weight = reader.get(source_name, dtype=torch.float32)
        if tgt.vocab_size <= weight.shape[0]:
            yield name, weight[: tgt.vocab_size]
        else:
            pad = weight.new_zeros(tgt.vocab_size - weight.shape[0], weight.shape[1])
            yield name, torch.cat([weight, pad])
    if spec.init is InitMethod.RANDOM:
        yield "model.norm.weight", torch.ones(tgt.hidden_size)
    else:
        yield "model.norm.weight", reader.get("model.norm.weight", dtype=torch.float32)


def attention_tensors(
    reader: TensorReader | None, src: ModelConfig, tgt: ModelConfig, layer: int, spec: UpcycleSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Attention and norms copied; a source without QKV bias (llama, mistral) gets zero biases."""
    p = f"model.layers.{layer}"
    gen = layer_generator(spec.seed, layer, "attention")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"{p}.self_attn.{proj}.weight"
        weight = (
            reader.get(key, dtype=torch.float32)
            if spec.init is not InitMethod.RANDOM
            else _fresh(_attention_shape(tgt, proj), spec.init_std, gen)
        )
        yield key, weight
        if proj != "o_proj":
            bias_key = f"{p}.self_attn.{proj}.bias"
            has_bias = src.qkv_bias and spec.init is not InitMethod.RANDOM
            yield bias_key, reader.get(bias_key, dtype=torch.float32) if has_bias else torch.zeros(weight.shape[0])
    for norm in ("input_layernorm", "post_attention_layernorm"):
        key = f"{p}.{norm}.weight"
        yield key, torch.ones(tgt.hidden_size) if spec.init is InitMethod.RANDOM else reader.get(key, torch.float32)


def _attention_shape(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    q, kv = cfg.num_attention_heads * cfg.attn_head_dim, cfg.num_key_value_heads * cfg.attn_head_dim
    return {"q_proj": (q, cfg.hidden_size), "k_proj": (kv, cfg.hidden_size), "v_proj": (kv, cfg.hidden_size)}.get(
        proj, (cfg.hidden_size, q)
    )


def moe_tensors(ffn: UpcycledFFN, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
    p = f"model.layers.{layer}.mlp"
    yield f"{p}.gate.weight", ffn.router
    yield from expert_tensors(layer, "gate_up_proj", ffn.gate_up)
    yield from expert_tensors(layer, "down_proj", ffn.down)
    if ffn.shared_gate is not None:
        yield f"{p}.shared_expert.gate_proj.weight", ffn.shared_gate
        yield f"{p}.shared_expert.up_proj.weight", ffn.shared_up
        yield f"{p}.shared_expert.down_proj.weight", ffn.shared_down
        yield f"{p}.shared_expert_gate.weight", ffn.shared_expert_gate


def layer_checks(
    ffn: UpcycledFFN, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, spec: UpcycleSpec
) -> dict[str, Any]:
    """Facts about one converted layer, recomputed from its outputs (reported in upcycle_report.json)."""
    checks: dict[str, Any] = {"router_std": float(ffn.router.float().std())}
    if ffn.reinit_mask is not None:
        checks["reinit_fraction"] = float(ffn.reinit_mask.float().mean())
    kept = ffn.source_neuron >= 0
    copies_neurons = spec.init in (InitMethod.QWEN2, InitMethod.DROP_UPCYCLING) and ffn.reinit_mask is not None
    if bool(kept.any()) and copies_neurons:
        # Every kept routed-expert neuron must equal a whole dense neuron (gate row, up row, down column),
        # compared in the output dtype without widening (the check must stay cheap next to the conversion).
        num_shared = ffn.source_neuron.shape[0] - ffn.gate_up.shape[0]
        routed_src = ffn.source_neuron[num_shared:]
        h, dtype = ffn.down.shape[2], ffn.gate_up.dtype
        # A fixed sample of experts keeps this a small share of the task's time; the tests check them all.
        sample = torch.linspace(0, routed_src.shape[0] - 1, min(CHECKED_EXPERTS, routed_src.shape[0])).long()
        gate_up, down_out = ffn.gate_up[sample], ffn.down[sample]
        mask = routed_src[sample] >= 0
        idx = routed_src[sample][mask]
        ok = torch.equal(gate_up[:, :h][mask], gate[idx].to(dtype))
        ok = ok and torch.equal(gate_up[:, h:][mask], up[idx].to(dtype))
        ok = ok and torch.equal(down_out.transpose(1, 2)[mask], down.T[idx].to(dtype))
        checks["kept_neurons_equal_dense"] = bool(ok)
        checks["kept_fraction"] = float(kept.float().mean())
    return checks


def run_task(
    task: Task,
    source_dir: str | None,
    out_dir: str,
    src: ModelConfig,
    tgt: ModelConfig,
    spec: UpcycleSpec,
    dtype: torch.dtype,
) -> ShardResult:
    """Compute and write one shard (runs inside a Ray task)."""
    start = time.perf_counter()
    # Failure tests need a run that is still going when they kill it; this stretches every task.
    time.sleep(float(os.environ.get("UPMOE_UPCYCLE_TASK_DELAY_S", "0")))
    torch.set_num_threads(1)  # tasks run side by side; each uses one core
    reader = TensorReader(source_dir) if source_dir and spec.init is not InitMethod.RANDOM else None
    items: list[tuple[str, torch.Tensor]] = []
    checks: dict[str, Any] = {}
    try:
        if not task.layers:
            items += [(k, v.to(dtype)) for k, v in embedding_tensors(reader, src, tgt, spec)]
        for layer in task.layers:
            items += [(k, v.to(dtype)) for k, v in attention_tensors(reader, src, tgt, layer, spec)]
            if spec.init is InitMethod.RANDOM:
                shape_f = (src.intermediate_size, src.hidden_size)
                gate = up = torch.zeros(shape_f)
                down = torch.zeros(shape_f[::-1])
            else:
                p = f"model.layers.{layer}.mlp"
                gate, up, down = (
                    reader.get(f"{p}.{n}.weight", torch.float32) for n in ("gate_proj", "up_proj", "down_proj")
                )
            ffn = upcycle_ffn(gate, up, down, spec=spec, layer=layer, out_dtype=dtype)
            items += list(moe_tensors(ffn, layer))
            checks[str(layer)] = layer_checks(ffn, gate, up, down, spec) if spec.init is not InitMethod.RANDOM else {}
            del gate, up, down, ffn
    finally:
        if reader is not None:
            reader.close()
    path = Path(out_dir) / task.file
    digest = hashlib.sha256()
    write_safetensors_file(path, items, metadata={"upmoe_task": task.label}, digest=digest)
    return ShardResult(
        file=task.file,
        keys=sorted(k for k, _ in items),
        bytes=path.stat().st_size,
        sha256=digest.hexdigest(),
        seconds=time.perf_counter() - start,
        checks=checks,
    )
