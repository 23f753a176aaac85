"""``upmoe bench moe-layer``: our MoE block (each expert backend) vs transformers' Qwen2MoeSparseMoeBlock
(each of its experts_implementation choices that runs here), same weights, same inputs, one process.

Default shape: the Qwen2-57B-A14B MoE layer scaled down 4x in width to fit a 2-core CPU — hidden 896,
64 routed experts of 640 (top-8), 8 shared experts fused into a 5120-wide shared expert.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from bench.timing import markdown_table, median_seconds
from moe_core.config import ModelConfig, ModelType
from moe_core.experts import ExpertBackend
from moe_core.moe import MoE


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=896, help="hidden size (57B-A14B: 3584)")
    p.add_argument("--expert-size", type=int, default=640, help="routed expert width (57B-A14B: 2560)")
    p.add_argument("--experts", type=int, default=64, help="routed experts")
    p.add_argument("--shared", type=int, default=8, help="shared experts fused into one MLP")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 2048], help="tokens per forward")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["eager", "grouped"], help="our backends to run")
    p.add_argument(
        "--packed",
        action="store_true",
        help="also time serving's CPU inference on prepacked experts (forward only): oneDNN, one call per expert, "
        "and, with AVX-512, the experts kernel (moe_core/cpu_experts.py), one call per layer",
    )
    p.add_argument(
        "--max-batched-bytes", type=int, default=4 * 2**30, help="skip transformers batched_mm above this gather size"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


def layer_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        model_type=ModelType.MOE,
        vocab_size=16,
        hidden_size=args.hidden,
        intermediate_size=args.expert_size * args.shared,
        num_hidden_layers=1,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=1,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_size,
        shared_expert_intermediate_size=args.expert_size * args.shared,
    )


def hf_blocks(cfg: ModelConfig, ours: MoE, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """transformers' block with our weights, once per experts_implementation that runs on this device."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    base = Qwen2MoeConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    impls = ["eager", "grouped_mm", "batched_mm"]
    blocks = {}
    for impl in impls:
        hc = copy.deepcopy(base)
        hc._experts_implementation = impl  # read by the block at call time, so one config per block
        block = Qwen2MoeSparseMoeBlock(hc).to(dtype)
        block.load_state_dict(ours.state_dict(), strict=True)
        blocks[f"transformers {impl}"] = block
    return blocks


def our_blocks(cfg: ModelConfig, backends: list[str], dtype: torch.dtype) -> dict[str, MoE]:
    torch.manual_seed(0)
    reference = MoE(cfg, backend="eager")
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.02)
    reference = reference.to(dtype)
    blocks = {}
    for name in backends:
        block = copy.deepcopy(reference)
        block.experts.backend = ExpertBackend(name)
        blocks[f"upmoe {name}"] = block
    return blocks


def packed_blocks(reference: MoE) -> dict[str, MoE]:
    """``reference``'s experts prepacked as serving packs them on a CPU: for oneDNN, and for the experts kernel
    where it runs here."""
    blocks = {}
    for name, kernel in (("upmoe packed, oneDNN", False), ("upmoe packed, experts kernel", True)):
        block = copy.deepcopy(reference).eval()
        block.experts.pack_for_cpu_inference(kernel=kernel)
        if kernel and block.experts.packed_for != "cpu-kernel":
            print(f"  skip {name}: needs AVX-512 (AVX512-BF16 for bf16) and a C compiler")
            continue
        blocks[name] = block
    return blocks


def batched_mm_bytes(cfg: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    slots = tokens * cfg.num_experts_per_tok
    per_slot = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return 2 * slots * per_slot * torch.finfo(dtype).bits // 8  # weights and their gradient


def _call(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def measure(block: torch.nn.Module, x: torch.Tensor, repeats: int, train: bool = True) -> tuple[float, float | None]:
    """Median seconds of a forward and, with ``train``, of a forward + backward (else None)."""

    def forward() -> None:
        with torch.no_grad():
            _call(block, x)

    grad_out = torch.randn_like(x)

    def forward_backward() -> None:
        block.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_()
        _call(block, xg).backward(grad_out)

    if not train:
        return median_seconds(forward, repeats=repeats), None
    return median_seconds(forward, repeats=repeats), median_seconds(forward_backward, repeats=repeats)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = layer_config(args)
    ours = our_blocks(cfg, args.backends, dtype)
    first = next(iter(ours.values()))
    packed = packed_blocks(first) if args.packed else {}
    blocks: dict[str, torch.nn.Module] = {**ours, **packed, **hf_blocks(cfg, first, dtype)}
    print(
        f"MoE layer: hidden {args.hidden}, {args.experts} routed experts x {args.expert_size} (top-{args.top_k}), "
        f"shared {args.shared} x {args.expert_size} = {args.shared * args.expert_size}, {args.dtype}, "
        f"torch threads {torch.get_num_threads()}"
    )
    results = []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, args.hidden, dtype=dtype)
        reference = _call(blocks["transformers eager"], x).detach()
        rows = {}
        for name, block in blocks.items():
            if name == "transformers batched_mm" and batched_mm_bytes(cfg, tokens, dtype) > args.max_batched_bytes:
                # batched_mm gathers a full weight copy per (token, expert) slot: it would not fit in memory.
                gib = batched_mm_bytes(cfg, tokens, dtype) / 2**30
                print(f"  skip {name}: would gather {gib:.0f} GiB of per-slot weights")
                continue
            try:
                fwd, fwd_bwd = measure(block, x, args.repeats, train=name not in packed)
                diff = float((_call(block, x).detach() - reference).abs().max())
            except (RuntimeError, NotImplementedError) as e:
                print(f"  skip {name}: {e}")
                continue
            train = tokens / fwd_bwd if fwd_bwd is not None else None
            rows[name] = {"forward_tok_s": tokens / fwd, "train_tok_s": train, "max_abs_diff": diff}
        hf = {k: v for k, v in rows.items() if k.startswith("transformers")}
        best_fwd = max(v["forward_tok_s"] for v in hf.values())
        best_train = max(v["train_tok_s"] for v in hf.values())
        eager = rows["transformers eager"]
        table = []
        for name, r in rows.items():
            train = r["train_tok_s"]
            table.append(
                [
                    name,
                    r["forward_tok_s"],
                    "-" if train is None else train,
                    r["forward_tok_s"] / best_fwd,
                    "-" if train is None else train / best_train,
                    r["forward_tok_s"] / eager["forward_tok_s"],
                    "-" if train is None else train / eager["train_tok_s"],
                    f"{r['max_abs_diff']:.1e}",
                ]
            )
            results.append({"tokens": tokens, "impl": name, **r})
        print(f"\n{tokens} tokens:")
        print(
            markdown_table(
                [
                    "implementation",
                    "fwd tok/s",
                    "fwd+bwd tok/s",
                    "fwd vs best HF",
                    "fwd+bwd vs best HF",
                    "fwd vs HF eager",
                    "fwd+bwd vs HF eager",
                    "max |diff|",
                ],
                table,
            )
        )
    if args.json:
        print(json.dumps(results))
    return 0
