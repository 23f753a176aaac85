"""``upmoe bench gpu-readiness``: the real training and serving code at the real shape on fake CUDA devices.

No machine the suite runs on has a GPU, and the GPU path has code no CPU run executes (NCCL takes only CUDA
tensors, autocast changes dtypes). This runs that code as rank 0 of a fake process group of any world size,
on fake CUDA tensors (``moe_core.fake_devices``): a CPU/CUDA mix, a host tensor handed to a collective, or a
residual stream that leaves the weights' dtype under (emulated) CUDA autocast fails the check. A 57B model
costs nothing there: there is no data.

What it cannot run: autograd on fake CUDA (a CPU build aborts), so backward and the optimizer step are run on
the meta device by the memory planner (``upmoe train --plan``) instead.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moe_core.config import ModelConfig
from moe_core.fake_devices import (
    EmulatedAutocast,
    checked_collectives,
    fake_cuda,
    fake_world,
    materialise,
    meta_model,
    residual_dtype_checked,
)
from moe_core.kv_cache import DEFAULT_BLOCK_SIZE, StepRow, blocks_for
from moe_core.state_dict_adapter import expert_block


@dataclass
class CheckResult:
    name: str
    seconds: float
    collectives: int
    detail: str


def check_training_forward(
    cfg: ModelConfig,
    *,
    world: int,
    ep: int,
    seq_len: int,
    micro_batch: int,
    param_dtype: torch.dtype = torch.float32,
    eval_blocks: int = 3,
) -> CheckResult:
    """One training step's forward work on rank 0 of ``world`` (EP ``ep``), as ``moe_train.loop`` runs it.

    ``param_dtype`` fp32 is the plain path (fp32 master weights, autocast bf16); bf16 is DeepSpeed's bf16
    engine. The step's reductions run too: loss parts, expert counts, selection bias, gradient reduction and
    clipping (on fake gradients), the stop flag and the held-out loss with its zero-weight padding.
    """
    from moe_train.config import AuxLoss, TrainConfig
    from moe_train.expert_parallel import (
        ParallelLayout,
        build_process_groups,
        clip_gradients,
        install_expert_parallel,
        reduce_gradients,
    )
    from moe_train.loop import held_out_loss, mean_over_ranks, micro_batch_loss, stop_requested, update_selection_bias

    started = time.perf_counter()
    train = TrainConfig(
        model="fake", data="fake", out="fake", workers=world, ep=ep, seq_len=seq_len, micro_batch=micro_batch,
        aux_loss=AuxLoss.GLOBAL, z_loss_coef=1e-3, zero_stage=0,
    )  # fmt: skip
    device = torch.device("cuda:0")
    with fake_world(world):
        layout = ParallelLayout(world_size=world, ep_size=ep, num_experts=cfg.num_experts)
        groups = build_process_groups(layout)
        model = meta_model(cfg, param_dtype, layout.first_expert(0), layout.experts_per_rank)
        with fake_cuda(), checked_collectives(device) as calls, EmulatedAutocast("cuda"):
            materialise(model, str(device))
            if ep > 1:
                install_expert_parallel(model, groups)
            model.train().requires_grad_(False)  # autograd on fake CUDA aborts a CPU build, even in forward
            ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)  # on the host, as the data loader gives it
            with residual_dtype_checked(model):
                loss, parts, counts_LE = micro_batch_loss(model, ids, train)
            mean_over_ranks(parts, world)
            dist.all_reduce(counts_LE)
            update_selection_bias(model, counts_LE, 1e-3)
            for p in model.parameters():  # no autograd on fake CUDA: the reductions get gradients of the right kind
                p.grad = torch.zeros_like(p)
            reduce_gradients(model, groups)
            clip_gradients(model, groups, 1.0)
            stop_requested(None, world, device)
            held_out_loss(model, torch.zeros(eval_blocks, seq_len, dtype=torch.long), micro_batch, 0, world)
            detail = f"loss {loss.dtype} on {loss.device}, logits of {micro_batch}×{seq_len}"
    return CheckResult(
        f"train forward world {world} EP {ep} params {param_dtype}", time.perf_counter() - started, len(calls), detail
    )


def check_serving(
    cfg: ModelConfig, *, ep: int, max_seq_len: int, prompt_lens: list[int], decode_steps: int
) -> CheckResult:
    """Rank 0 of an EP gang: load-free shard in bf16 on fake CUDA; one step prefilling the prompts, then steps
    mixing a decode token per sequence with a second chunk of the first prompt (chunked prefill)."""
    from serve.gang import install_token_sharding
    from serve.runner import ModelShard, ShardSpec

    started = time.perf_counter()
    device = torch.device("cuda:0")
    per_rank = expert_block(cfg.num_experts, ep, 0)[1] if cfg.is_moe else None
    per_seq = blocks_for(max_seq_len, DEFAULT_BLOCK_SIZE)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompt_lens))]
    # "cuda:0", not "cuda": resolving a bare "cuda" asks the (absent) CUDA runtime for the current device.
    spec = ShardSpec("fake", per_seq * len(prompt_lens), max_seq_len, torch.bfloat16, "cuda:0", ep_rank=0, ep_size=ep)
    model = meta_model(cfg, torch.bfloat16, 0, per_rank)
    with fake_world(ep), fake_cuda(), checked_collectives(device) as calls:
        shard = ModelShard(spec, model=materialise(model, spec.device))
        if ep > 1:
            install_token_sharding(shard.model, dist.group.WORLD, ep, 0)
        lengths = list(prompt_lens)
        with residual_dtype_checked(shard.model):
            out = shard.step([StepRow([1] * n, 0, tables[i]) for i, n in enumerate(lengths)])
            for _ in range(decode_steps):
                rows = [StepRow([1], n, tables[i]) for i, n in enumerate(lengths[1:], start=1)]
                rows.append(StepRow([1] * 3, lengths[0], tables[0], logits="all"))  # a chunk among decodes
                out = shard.step(rows)
                lengths = [lengths[0] + 3] + [n + 1 for n in lengths[1:]]
        detail = f"logits {list(out.logits_RV.shape)} {out.logits_RV.dtype} on {out.logits_RV.device}"
    return CheckResult(f"serve prefill+decode EP {ep}", time.perf_counter() - started, len(calls), detail)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the training forward (EP all-to-all, losses, gradient reduction and clipping, held-out loss) and "
        "serving prefill/decode for rank 0 of a layout on fake CUDA tensors with a fake process group: any "
        "CPU/CUDA mix, host tensor given to a collective or dtype drift of the residual stream fails. No GPU, "
        "no weights, no memory: the full Qwen2-57B-A14B shape takes seconds."
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--preset", default="qwen2-57b-a14b", help="a model shape from upmoe's registry")
    shape.add_argument("--model-config", type=Path, help="an HF config.json (or its directory) instead of --preset")
    p.add_argument("--world", type=int, default=16, help="training ranks")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size, for training and for the serving gang")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--prompt-lens", default="4096,100,1", help="comma-separated prompt lengths of the prefill")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def run(args: argparse.Namespace) -> int:
    import json
    import warnings

    from moe_core.config import read_model_config
    from moe_core.registry import get_preset

    warnings.filterwarnings("ignore", message=".*CUDA.*")  # torch.autocast("cuda") on a CPU build says so
    cfg = read_model_config(args.model_config) if args.model_config else get_preset(args.preset)
    prompts = [int(n) for n in args.prompt_lens.split(",")]
    checks = [
        ("train forward, fp32 master weights", lambda: check_training_forward(
            cfg, world=args.world, ep=args.ep, seq_len=args.seq_len, micro_batch=args.micro_batch
        )),
        ("train forward, bf16 parameters", lambda: check_training_forward(
            cfg,
            world=args.world,
            ep=args.ep,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            param_dtype=torch.bfloat16,
        )),
        ("serve prefill and decode", lambda: check_serving(
            cfg,
            ep=args.ep,
            max_seq_len=max(prompts) + 16,
            prompt_lens=prompts,
            decode_steps=2,
        )),
    ]  # fmt: skip
    results, failed = [], 0
    for label, check in checks:
        try:
            r = check()
            results.append({"check": r.name, "ok": True, "seconds": round(r.seconds, 2), "collectives": r.collectives})
            print(f"PASS  {r.name}: {r.collectives} collectives, {r.detail} ({r.seconds:.1f} s)")
        except Exception as exc:  # report every check, then fail
            failed += 1
            results.append({"check": label, "ok": False, "error": repr(exc)[:500]})
            print(f"FAIL  {label}: {type(exc).__name__}: {exc}")
    print(f"{len(checks) - failed}/{len(checks)} GPU-readiness checks passed")
    if args.json:
        print(json.dumps({"ok": not failed, "checks": results}))
    return 1 if failed else 0
