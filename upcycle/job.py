"""The upcycling Ray job: one task per layer group plus one for the embeddings, run with bounded concurrency.

Safety: tasks write into ``.OUT.upcycle-partial/`` next to OUT_DIR; a manifest there records every finished
shard's size and sha256 as it lands. Only when every shard is present and verified are index, config,
tokenizer and report written and the directory renamed to OUT_DIR, so nothing that looks complete ever
exists half-written. ``--resume`` re-verifies the recorded shards and recomputes only the missing ones.

On a cluster (``--ray-address``), SOURCE_DIR and OUT_DIR must be paths every node sees (a shared
filesystem such as NFS/EFS/Filestore mounted at the same path); tasks read and write them directly.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moe_core.checkpoint_io import CheckpointError, TensorReader, file_sha256, write_index
from moe_core.fileutil import write_text_atomic
from moe_core.loading import TOKENIZER_FILES, check_keys, config_with_dtype
from moe_core.state_dict_adapter import expected_hf_keys
from upcycle.plan import Plan
from upcycle.recipe import InitMethod
from upcycle.source import fingerprint
from upcycle.tasks import ShardResult, Task, plan_tasks, run_task

MANIFEST = "upcycle_manifest.json"
REPORT = "upcycle_report.json"


class UpcycleError(RuntimeError):
    """The job cannot proceed; the message says what and where."""


@dataclass
class JobOptions:
    out_dir: Path
    dtype: torch.dtype
    ray_address: str | None = None
    max_parallel: int | None = None
    layers_per_task: int = 1
    overwrite: bool = False
    resume: bool = False
    progress: bool = True


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.upcycle-partial"


def task_memory_bytes(plan: Plan, layers_per_task: int) -> int:
    """fp32 working set of one task: dense FFN + MoE layer (+ its cast copy), per layer in the group."""
    t = plan.target
    dense = 3 * t.hidden_size * t.intermediate_size * 4
    moe = 3 * t.hidden_size * t.moe_intermediate_size * (t.num_experts + plan.spec.num_shared) * 4
    embed = 2 * t.vocab_size * t.hidden_size * 4
    return max(layers_per_task * (dense + 2 * moe), 2 * embed) + 256 * 2**20


def output_bytes(plan: Plan, dtype: torch.dtype) -> int:
    from moe_core.params import count_parameters

    return count_parameters(plan.target).total * torch.finfo(dtype).bits // 8


def _default_parallel(plan: Plan, options: JobOptions) -> int:
    import ray

    resources = ray.available_resources()
    cpus = int(resources.get("CPU", 1))
    memory = resources.get("memory", 0) or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return max(1, min(cpus, int(memory // task_memory_bytes(plan, options.layers_per_task))))


def _check_disk(path: Path, need: int) -> None:
    free = shutil.disk_usage(path).free
    if free < need:
        raise UpcycleError(f"no disk space: the output needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free at {path}")


def _prepare_partial(plan: Plan, options: JobOptions, fp: str) -> tuple[Path, dict[str, Any]]:
    """The partial directory and its manifest: reused on --resume when it belongs to the same job."""
    out, part = options.out_dir, partial_dir(options.out_dir)
    if out.exists() and not (options.overwrite or options.resume):
        raise UpcycleError(f"{out} exists; pass --overwrite to replace it or --resume to continue into it")
    if out.exists() and options.resume and not part.exists():
        report = out / REPORT
        if report.exists() and json.loads(report.read_text()).get("source_fingerprint") == fp:
            raise UpcycleError(f"{out} is already complete for this source; nothing to resume")
        raise UpcycleError(f"{out} exists and is not an unfinished upcycling of this source; use --overwrite")
    identity = {
        "source_fingerprint": fp,
        "recipe": plan.as_dict()["recipe"],
        "dtype": str(options.dtype),
        "layers_per_task": options.layers_per_task,
    }
    manifest_path = part / MANIFEST
    if part.exists():
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        if options.resume and manifest.get("identity") == identity:
            return part, manifest
        if options.resume:
            print(f"note: {part} belongs to a different job (source, recipe or dtype changed); starting over")
        shutil.rmtree(part)
    part.mkdir(parents=True)
    manifest = {"identity": identity, "shards": {}}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
    return part, manifest


def _verified(part: Path, record: dict[str, Any], checksum: bool = True) -> bool:
    """The shard is there with the recorded size (and, when asked, the recorded sha256).

    Shards written by this run were hashed as they were written; re-reading them would cost as much as the
    write, so only shards inherited from an interrupted run (--resume) are re-hashed.
    """
    path = part / record["file"]
    if not path.exists() or path.stat().st_size != record["bytes"]:
        return False
    return not checksum or file_sha256(path) == record["sha256"]


def _run_tasks(plan: Plan, options: JobOptions, part: Path, manifest: dict[str, Any], todo: list[Task]) -> float:
    import ray

    if not ray.is_initialized():
        ray.init(address=options.ray_address, log_to_driver=False, configure_logging=False)
    limit = options.max_parallel or _default_parallel(plan, options)
    remote = ray.remote(run_task).options(num_cpus=1, max_retries=2)
    source = str(plan.source.path) if plan.source.path else None
    src_ref, tgt_ref = ray.put(plan.source.config), ray.put(plan.target)
    start, written = time.perf_counter(), 0
    bar = tqdm(total=len(todo), unit="shard", disable=not options.progress, desc="upcycle")
    pending: dict[Any, Task] = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < limit:
            task = queue.pop(0)
            ref = remote.remote(task, source, str(part), src_ref, tgt_ref, plan.spec, options.dtype)
            pending[ref] = task
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        result: ShardResult = ray.get(done[0])
        manifest["shards"][task.file] = {"task": task.label, **asdict(result)}
        write_text_atomic(part / MANIFEST, json.dumps(manifest, indent=2))
        written += result.bytes
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{task.label}, {written / 1e9:.2f} GB written, {written / 1e9 / elapsed:.2f} GB/s")
        bar.update(1)
    bar.close()
    return time.perf_counter() - start


def _finish(plan: Plan, options: JobOptions, part: Path, manifest: dict[str, Any], report: dict[str, Any]) -> None:
    """Verify every shard, write the metadata files, then publish the directory."""
    tasks = plan_tasks(plan.target.num_hidden_layers, options.layers_per_task)
    weight_map, total = {}, 0
    for task in tasks:
        record = manifest["shards"].get(task.file)
        if record is None or not _verified(part, record, checksum=False):
            raise UpcycleError(f"shard {task.file} ({task.label}) is missing or fails its checksum in {part}")
        weight_map.update({k: task.file for k in record["keys"]})
        total += sum(_tensor_bytes(part / task.file))
    missing = expected_hf_keys(plan.target) - set(weight_map)
    if missing:
        raise UpcycleError(
            f"the output lacks {len(missing)} tensor(s) of the target config, e.g. {sorted(missing)[:3]}"
        )
    write_index(part, weight_map, total)
    write_text_atomic(part / "config.json", config_with_dtype(plan.target, options.dtype).to_json())
    if plan.source.path is not None:
        for name in TOKENIZER_FILES:
            if (plan.source.path / name).exists():
                shutil.copyfile(plan.source.path / name, part / name)
    # The reader must accept the result before it is published.
    try:
        with TensorReader(part) as reader:
            reader.validate()
    except CheckpointError as e:
        raise UpcycleError(f"the assembled output failed validation: {e}") from e
    write_text_atomic(part / REPORT, json.dumps(report, indent=2) + "\n")
    (part / MANIFEST).unlink()
    _publish(part, options.out_dir)


def _tensor_bytes(path: Path) -> list[int]:
    """Bytes of each tensor in a safetensors file, from its header."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]


def _publish(part: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
    os.replace(part, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_upcycle(plan: Plan, options: JobOptions) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to OUT_DIR/upcycle_report.json)."""
    t0 = time.perf_counter()
    if plan.source.path is not None and plan.spec.init is not InitMethod.RANDOM:
        # Every tensor the tasks will read must be there: fail now, not inside a remote task.
        with TensorReader(plan.source.path) as reader:
            check_keys(reader, plan.source.config, plan.source.path)
    fp = fingerprint(plan.source)
    part, manifest = _prepare_partial(plan, options, fp)
    _check_disk(part.parent, output_bytes(plan, options.dtype))
    tasks = plan_tasks(plan.target.num_hidden_layers, options.layers_per_task)
    reused = [t for t in tasks if t.file in manifest["shards"] and _verified(part, manifest["shards"][t.file])]
    todo = [t for t in tasks if t not in reused]
    for task in todo:  # a recorded shard that fails verification is recomputed
        manifest["shards"].pop(task.file, None)
    if reused:
        print(f"resume: reusing {len(reused)} verified shard(s), computing {len(todo)}")
    task_seconds = _run_tasks(plan, options, part, manifest, todo) if todo else 0.0
    shards = manifest["shards"]
    report = {
        **plan.as_dict(),
        "seed": plan.spec.seed,
        "source": str(plan.source.path),
        "source_fingerprint": fp,
        "dtype": str(options.dtype).removeprefix("torch."),
        "shards": {
            name: {k: r[k] for k in ("task", "bytes", "sha256", "seconds")} for name, r in sorted(shards.items())
        },
        "layer_checks": {layer: c for r in shards.values() for layer, c in r["checks"].items()},
        "reused_shards": len(reused),
        "timings": {"tasks_s": round(task_seconds, 3)},
    }
    report["bytes_written"] = sum(r["bytes"] for r in shards.values())
    _finish(plan, options, part, manifest, report)
    report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    write_text_atomic(options.out_dir / REPORT, json.dumps(report, indent=2) + "\n")
    return report
