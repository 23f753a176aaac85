"""``upmoe bench export``: the peak memory of ``upmoe export`` on a sharded checkpoint of a real upcycled shape.

In one run: write a sharded (DCP) checkpoint of a dense shape upcycled into 64 routed + 8 shared experts
(default: qwen2-0.5b, 2.86 B parameters, 11.4 GB in fp32), laid out as an FSDP run leaves it (one global tensor
per expert stack), then run ``upmoe export`` on it in a child process for each ``--dtype`` and report its wall
time and peak RSS against the bound "one decoder layer's tensors in fp32 + 1 GiB". The weights are zeros: what
is measured is memory and I/O, not values.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.timing import markdown_table

GIB = 2**30


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="qwen2-0.5b", help="dense shape to upcycle (qwen2-0.5b, qwen2-1.5b, ...)")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp32"), help="export dtypes")
    p.add_argument("--workdir", type=Path, help="where to write (default: a temp dir on the current disk)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")


def upcycled_config(preset: str, where: Path):
    """The Qwen2-MoE config the Qwen2 recipe makes of a dense preset (64 routed + 8 shared experts, top-8)."""
    from moe_core.registry import get_preset
    from upcycle.plan import resolve_shape, target_config
    from upcycle.source import read_source_config

    dense = where / "dense-config.json"
    dense.write_text(json.dumps(get_preset(preset).to_hf_dict()))
    return target_config(read_source_config(dense), resolve_shape(None))


def write_run(run_dir: Path, cfg) -> None:
    """A run directory holding one sharded checkpoint of ``cfg``, as ``--sharding fsdp`` writes it."""
    import torch
    import torch.distributed.checkpoint as dcp

    from moe_core.model import CausalLM
    from moe_train.config import TrainConfig
    from moe_train.loop import META_FILE
    from moe_train.trainer import RUN_NAME

    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    train = TrainConfig(model=str(model_dir), data="embedded", out=str(run_dir), sharding="fsdp")
    (run_dir / "train_config.json").write_text(json.dumps(train.as_dict(), indent=2))
    checkpoint = run_dir / "ray" / RUN_NAME / "checkpoint_000001"
    with torch.device("meta"):
        shapes = dict(CausalLM(cfg).named_parameters())
    state = {name: torch.zeros(p.shape) for name, p in shapes.items()}  # untouched pages until written
    with warnings.catch_warnings():  # "no process group: saving in one process" is the point here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)
    (checkpoint / META_FILE).write_text(json.dumps({"step": 1}))


def layer_fp32_bytes(cfg) -> int:
    import torch

    from moe_core.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    return sum(p.numel() * 4 for p in model.model.layers[0].parameters())


# Runs the CLI in a fresh interpreter and reports that process's own peak RSS (KiB on Linux) on its last line.
_MEASURED_CLI = (
    "import resource, sys; from upmoe.cli import main; rc = main(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); sys.exit(rc)"
)


def export_child(run_dir: Path, out: Path, dtype: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``upmoe export`` in a fresh process."""
    start = time.perf_counter()
    cmd = [sys.executable, "-c", _MEASURED_CLI, "export", str(run_dir), str(out), "--dtype", dtype]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    return wall, int(done.stdout.split()[-1]) * 1024


def run(args: argparse.Namespace) -> int:
    from moe_core.params import count_parameters

    work = Path(tempfile.mkdtemp(prefix="upmoe-bench-export-", dir=args.workdir))
    try:
        cfg = upcycled_config(args.preset, work)
        t0 = time.perf_counter()
        # In a child: a process started from this one would report this one's peak (Linux keeps the peak RSS
        # across exec), and writing the checkpoint touches all of it.
        code = "import sys; from bench.export import upcycled_config, write_run; from pathlib import Path; "
        code += "w = Path(sys.argv[1]); write_run(w / 'run', upcycled_config(sys.argv[2], w))"
        subprocess.run([sys.executable, "-c", code, str(work), args.preset], check=True)
        ckpt_bytes = sum(f.stat().st_size for f in (work / "run").rglob("*.distcp"))
        print(f"wrote a {ckpt_bytes / GIB:.1f} GiB sharded checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
        layer = layer_fp32_bytes(cfg)
        bound = layer + GIB
        rows = []
        for dtype in args.dtype:
            out = work / f"out-{dtype}"
            wall, peak = export_child(work / "run", out, dtype)
            written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append(
                dict(dtype=dtype, wall_s=round(wall, 1), peak_rss_gib=round(peak / GIB, 2),
                     written_gib=round(written / GIB, 2), gb_per_s=round(written / 1e9 / wall, 2),
                     within_bound=peak <= bound)
            )  # fmt: skip
            shutil.rmtree(out)
        params = count_parameters(cfg).total
        print(f"\n{args.preset} upcycled: {params:,} parameters, checkpoint {ckpt_bytes / GIB:.2f} GiB (fp32 weights)")
        print(f"bound: one decoder layer in fp32 ({layer / GIB:.2f} GiB) + 1 GiB = {bound / GIB:.2f} GiB\n")
        header = ["--dtype", "wall s", "peak RSS GiB", "written GiB", "GB/s", "within bound"]
        table = [[r["dtype"], r["wall_s"], r["peak_rss_gib"], r["written_gib"], r["gb_per_s"], r["within_bound"]]
                 for r in rows]  # fmt: skip
        print(markdown_table(header, table))
        if args.json:
            print(json.dumps(dict(preset=args.preset, parameters=params, layer_fp32_gib=layer / GIB,
                                  bound_gib=bound / GIB, results=rows)))  # fmt: skip
        return 0 if all(r["within_bound"] for r in rows) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
