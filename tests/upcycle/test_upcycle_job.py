"""``upmoe upcycle`` end to end, in-process on one local Ray (the ``ray_local`` fixture), on tiny sources made by
``upmoe init --preset debug`` and by transformers (Llama, Qwen2), with transformers as the oracle.

What is checked on the OUTPUT CHECKPOINT alone (never through upcycle.recipe): preserve init computes the dense
function exactly (our model, transformers, ``upmoe eval``); qwen2 init keeps exactly half of each expert's neurons
whole from the dense FFN, consistently with shuffled copies, and re-draws the other half from the replaced
matrix's statistics; the report; determinism; the other inits; overwrite and failures inside a task.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from upcycle_testlib import (
    FFN,
    FRESH,
    HIDDEN,
    LAYERS,
    PARTIAL,
    REPORT,
    Block,
    dense_ffn,
    files_except_report,
    fresh_values,
    hf_logits,
    neuron_origins,
    our_logits,
    read_all,
    report,
    round_half_up,
    routed_expert,
    run_cli,
    shared_expert,
    token_batch,
    upcycle,
)

from tests.tokenizer_parity import assert_transformers_tokenizes_like_upmoe
from upcycle.job import MANIFEST, partial_dir

pytestmark = pytest.mark.usefixtures("ray_local", "torch_single_thread")

TOL = 1e-4
E, K = 64, 8  # default routed experts and top-k
PRESERVE = ("--init", "preserve", "--num-shared-experts", "8", "--expert-size", "32")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upcycled")


@pytest.fixture(scope="module")
def qwen2_skewed_out(outputs: Path, skewed_dense: Path) -> Path:
    """Default (qwen2) init of the skewed-statistics debug model, with the step-0 quality check."""
    out = outputs / "qwen2-skewed"
    upcycle(skewed_dense, out, "--seed", "5", eval_tokens=4096)
    return out


@pytest.fixture(scope="module")
def qwen2_llama_out(outputs: Path, llama_dense: Path) -> Path:
    """Default (qwen2) init of a transformers Llama (step-0 check off: see test_llama_source_step0_quality)."""
    out = outputs / "qwen2-llama"
    upcycle(llama_dense, out)
    return out


@pytest.fixture(scope="module")
def odd_shape_out(outputs: Path, skewed_dense: Path) -> Path:
    """Expert size 25 (chunks straddle copies; 12.5 re-drawn rounds up to 13), 4 shared, router std 0.05."""
    out = outputs / "odd-shape"
    upcycle(skewed_dense, out, "--expert-size", "25", "--num-shared-experts", "4", "--router-std", "0.05")
    return out


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def _eval_loss(model_dir: Path) -> float:
    result = run_cli("eval", model_dir, "--json", "--max-tokens", "2048", "--seq-len", "256")
    assert result.rc == 0, result.err
    return result.last_json()["loss"]


@torch.no_grad()
def _hf_eval_loss(model_dir: Path) -> float:
    """What `upmoe eval --max-tokens 2048 --seq-len 256` computes, with transformers (for sources we cannot load)."""
    from transformers import AutoModelForCausalLM

    from moe_core.corpus import embedded_corpus
    from moe_core.evaluate import token_blocks
    from moe_core.tokenizer import Tokenizer

    blocks = token_blocks(Tokenizer.from_dir(model_dir).encode(embedded_corpus("eval")), 256, 2048)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = [float(model(b[None], labels=b[None]).loss) for b in blocks]
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------- preserve


@pytest.mark.slow
@pytest.mark.parametrize("source_name", ["debug_dense", "skewed_dense"])
def test_preserve_reproduces_the_dense_model(
    request: pytest.FixtureRequest, source_name: str, outputs: Path, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(source_name)
    out = tmp_path / "preserve"
    upcycle(source, out, *PRESERVE, eval_tokens=2048)
    ids = token_batch(seed=1)
    dense = our_logits(source, ids)
    assert float(dense.std()) > 1e-2  # the tolerance below is small next to the logits
    hf_dense = hf_logits(source, ids, expect_class="Qwen2ForCausalLM")
    assert (hf_dense - dense).abs().max() <= TOL  # the oracle agrees on the source first
    assert (our_logits(out, ids) - dense).abs().max() <= TOL
    assert (hf_logits(out, ids, expect_class="Qwen2MoeForCausalLM") - dense).abs().max() <= TOL
    assert abs(_eval_loss(out) - _eval_loss(source)) <= TOL
    step0 = report(out)["step0"]
    assert abs(step0["moe_loss"] - step0["dense_loss"]) <= TOL


def test_preserve_reproduces_a_llama_source(llama_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "preserve-llama"
    upcycle(llama_dense, out, *PRESERVE)
    ids = token_batch(seed=2)
    dense = hf_logits(llama_dense, ids, expect_class="LlamaForCausalLM")  # the oracle
    assert float(dense.std()) > 1e-2
    assert (our_logits(out, ids) - dense).abs().max() <= TOL
    assert (hf_logits(out, ids, expect_class="Qwen2MoeForCausalLM") - dense).abs().max() <= TOL
    assert abs(_eval_loss(out) - _hf_eval_loss(llama_dense)) <= TOL
    tensors = read_all(out)
    for layer in range(LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = tensors[f"model.layers.{layer}.self_attn.{proj}.bias"]
            assert bias.shape == (tensors[f"model.layers.{layer}.self_attn.{proj}.weight"].shape[0],)
            assert not bias.any()
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors


# ---------------------------------------------------------------------------------------------- qwen2 init


def _check_qwen2_neurons(source: Path, out: Path) -> dict[str, dict[int, list[torch.Tensor]]]:
    """Every expert (routed, and each chunk of the shared one) keeps exactly h - round_half_up(h/2) whole dense
    neurons and re-draws the rest; kept neurons follow the shuffled-copies stream: within one copy no dense
    neuron appears twice (a chunk that straddles two copies may hold one neuron twice). Returns the re-drawn
    values per matrix and layer."""
    cfg = _config(out)
    h, e = cfg["moe_intermediate_size"], cfg["num_experts"]
    num_shared = cfg["shared_expert_intermediate_size"] // h
    src, tgt = read_all(source), read_all(out)
    fresh: dict[str, dict[int, list[torch.Tensor]]] = {"gate": {}, "up": {}, "down": {}}
    for layer in range(cfg["num_hidden_layers"]):
        dense = dense_ffn(src, layer)
        shared = shared_expert(tgt, layer)
        chunks: list[Block] = [shared.cols(c * h, (c + 1) * h) for c in range(num_shared)]
        chunks += [routed_expert(tgt, layer, i) for i in range(e)]
        kept_by_copy: dict[int, list[int]] = {}
        for c, block in enumerate(chunks):
            origins = neuron_origins(block, dense)
            what = f"layer {layer} chunk {c} ({'shared' if c < num_shared else f'routed {c - num_shared}'})"
            assert PARTIAL not in origins, f"{what}: a neuron matches a dense neuron only in part"
            assert origins.count(FRESH) == round_half_up(0.5 * h), what
            for j, o in enumerate(origins):  # slot j of chunk c is position c*h + j of the stream of copies
                if o >= 0:
                    kept_by_copy.setdefault((c * h + j) // FFN, []).append(o)
            for name, values in zip(("gate", "up", "down"), fresh_values(block, origins), strict=True):
                fresh[name].setdefault(layer, []).append(values)
        for copy, kept in kept_by_copy.items():
            assert len(set(kept)) == len(kept), f"layer {layer}: copy {copy} holds a dense neuron twice"
        assert len(kept_by_copy) == math.ceil(len(chunks) * h / FFN)
    return fresh


@pytest.mark.parametrize(
    ("source_name", "out_name"),
    [("skewed_dense", "qwen2_skewed_out"), ("llama_dense", "qwen2_llama_out"), ("skewed_dense", "odd_shape_out")],
)
def test_qwen2_init_keeps_half_of_every_expert_whole(
    request: pytest.FixtureRequest, source_name: str, out_name: str
) -> None:
    source, out = request.getfixturevalue(source_name), request.getfixturevalue(out_name)
    fresh = _check_qwen2_neurons(source, out)
    src = read_all(source)
    for layer in range(LAYERS):
        dense = dense_ffn(src, layer)
        for name, matrix in (("gate", dense.gate), ("up", dense.up), ("down", dense.down)):
            drawn = torch.cat(fresh[name][layer]).double()
            m, s, n = float(matrix.double().mean()), float(matrix.double().std()), drawn.numel()
            assert abs(float(drawn.mean()) - m) <= 5 * s / math.sqrt(n), (layer, name)
            assert abs(float(drawn.std()) / s - 1) <= 5 / math.sqrt(2 * n) + 0.01, (layer, name)


def test_skewed_source_statistics_are_distinct(skewed_dense: Path) -> None:
    """Guards the statistics test above: each matrix has its own mean/std, far from N(0, 0.02)."""
    src = read_all(skewed_dense)
    stats = {
        (layer, name): (round(float(getattr(dense_ffn(src, layer), name).mean()), 2),)
        + (round(float(getattr(dense_ffn(src, layer), name).std()), 2),)
        for layer in range(LAYERS)
        for name in ("gate", "up", "down")
    }
    assert len(set(stats.values())) == len(stats)


def test_shapes_and_config(qwen2_skewed_out: Path, odd_shape_out: Path) -> None:
    for out, h, shared in ((qwen2_skewed_out, 32, 8), (odd_shape_out, 25, 4)):
        cfg = _config(out)
        assert cfg["model_type"] == "qwen2_moe" and cfg["architectures"] == ["Qwen2MoeForCausalLM"]
        assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (E, K, h)
        assert cfg["shared_expert_intermediate_size"] == shared * h
        t = read_all(out)
        for layer in range(LAYERS):
            p = f"model.layers.{layer}.mlp"
            assert t[f"{p}.shared_expert.gate_proj.weight"].shape == (shared * h, HIDDEN)
            assert t[f"{p}.shared_expert.up_proj.weight"].shape == (shared * h, HIDDEN)
            assert t[f"{p}.shared_expert.down_proj.weight"].shape == (HIDDEN, shared * h)
            assert t[f"{p}.shared_expert_gate.weight"].shape == (1, HIDDEN)
            assert t[f"{p}.gate.weight"].shape == (E, HIDDEN)
            assert t[f"{p}.experts.{E - 1}.down_proj.weight"].shape == (HIDDEN, h)
            assert f"{p}.experts.{E}.gate_proj.weight" not in t


def test_attention_norms_and_embeddings_are_copied(skewed_dense: Path, qwen2_skewed_out: Path) -> None:
    src, tgt = read_all(skewed_dense), read_all(qwen2_skewed_out)
    copied = [k for k in src if ".mlp." not in k]
    assert copied
    for key in copied:
        assert torch.equal(tgt[key], src[key]), key


def test_tokenizer_is_copied_and_transformers_tokenizes_like_upmoe(skewed_dense: Path, qwen2_skewed_out: Path) -> None:
    """The dense source is a qwen2 directory and the output a qwen2_moe one: transformers loads both with
    Qwen2Tokenizer, whose pipeline is its own, so the files must say exactly that pipeline."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (qwen2_skewed_out / name).read_bytes() == (skewed_dense / name).read_bytes(), name
    assert_transformers_tokenizes_like_upmoe(skewed_dense)
    assert_transformers_tokenizes_like_upmoe(qwen2_skewed_out)


def test_router_std(qwen2_skewed_out: Path, odd_shape_out: Path) -> None:
    for out, std in ((qwen2_skewed_out, 0.02), (odd_shape_out, 0.05)):
        t = read_all(out)
        routers = torch.stack([t[f"model.layers.{layer}.mlp.gate.weight"] for layer in range(LAYERS)])
        assert abs(float(routers.mean())) <= 5 * std / math.sqrt(routers.numel())
        assert abs(float(routers.std()) / std - 1) <= 0.05
        gates = torch.cat([t[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] for layer in range(LAYERS)])
        assert 0.7 <= float(gates.std()) / std <= 1.3  # 128 values
        for layer, checks in report(out)["layer_checks"].items():
            assert checks["router_std"] == pytest.approx(float(t[f"model.layers.{layer}.mlp.gate.weight"].std()))


# ---------------------------------------------------------------------------------------------- report


def test_report(skewed_dense: Path, qwen2_skewed_out: Path) -> None:
    out = qwen2_skewed_out
    rep = report(out)
    assert rep["seed"] == 5
    assert rep["recipe"]["init"] == "qwen2" and rep["recipe"]["reinit_ratio"] == 0.5
    assert rep["recipe"]["seed"] == 5 and rep["recipe"]["router_std"] == 0.02
    assert len(rep["source_fingerprint"]) == 64 and int(rep["source_fingerprint"], 16) >= 0

    tensors = read_all(out)
    total = sum(t.numel() for t in tensors.values())
    expert = 3 * HIDDEN * 32
    assert rep["params_total"] == total
    assert rep["params_activated"] == total - LAYERS * (E - K) * expert

    assert set(rep["layer_checks"]) == {str(i) for i in range(LAYERS)}
    for checks in rep["layer_checks"].values():
        assert checks["kept_neurons_equal_dense"] is True
        assert checks["reinit_fraction"] == 0.5

    assert rep["timings"]["total_s"] > 0 and "tasks_s" in rep["timings"]
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert sorted(rep["shards"]) == shards and len(shards) == LAYERS + 1
    for name, shard in rep["shards"].items():
        data = (out / name).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert rep["reused_shards"] == 0

    step0 = rep["step0"]
    assert math.isfinite(step0["dense_loss"]) and math.isfinite(step0["moe_loss"])
    assert step0["eval_tokens"] == 4096
    assert abs(step0["aux_loss"] / K - 1) <= 0.2
    assert abs(step0["router_entropy"] / math.log(E) - 1) <= 0.1

    # Published: no manifest, no partial directory left, the tokenizer next to the weights.
    assert not (out / MANIFEST).exists() and not partial_dir(out).exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (skewed_dense / name).read_bytes()


def test_json_summary_is_the_last_line(debug_dense: Path, tmp_path: Path) -> None:
    result = upcycle(debug_dense, tmp_path / "out")
    summary = result.last_json()
    rep = report(tmp_path / "out")
    assert summary["out_dir"] == str(tmp_path / "out")
    assert (summary["params_total"], summary["params_activated"]) == (rep["params_total"], rep["params_activated"])
    assert summary["source_fingerprint"] == rep["source_fingerprint"] and "step0" not in summary


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_shards(debug_dense: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "nested" / "b", tmp_path / "c"
    b.parent.mkdir()
    upcycle(debug_dense, a, "--seed", "7")
    upcycle(debug_dense, b, "--seed", "7")
    upcycle(debug_dense, c, "--seed", "8")
    files_a, files_b, files_c = files_except_report(a), files_except_report(b), files_except_report(c)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two runs with the same seed"
    sha = {name: shard["sha256"] for name, shard in report(a)["shards"].items()}
    assert sha == {name: shard["sha256"] for name, shard in report(b)["shards"].items()}
    layer_shards = sorted(report(a)["shards"])[1:]  # the first shard holds the (copied) embeddings
    for name in layer_shards:
        assert files_a[name] != files_c[name], f"{name} is the same with another seed"


def test_tensors_do_not_depend_on_grouping_or_parallelism(debug_dense: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "per-layer", tmp_path / "grouped"
    upcycle(debug_dense, a, "--seed", "3", "--max-parallel", "2")
    upcycle(debug_dense, b, "--seed", "3", "--max-parallel", "1", "--layers-per-task", "2")
    ta, tb = read_all(a), read_all(b)
    assert len(list(b.glob("model-*.safetensors"))) == 2
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_bf16_output_is_the_fp32_output_cast(debug_dense: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    upcycle(debug_dense, a, "--seed", "4")
    upcycle(debug_dense, b, "--seed", "4", "--dtype", "bf16")
    ta, tb = read_all(a), read_all(b)
    for key in ta:
        assert tb[key].dtype == torch.bfloat16, key
        assert torch.equal(tb[key], ta[key].to(torch.bfloat16)), key
    assert _config(b)["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------- other inits


def _check_drop_upcycling(src: dict, tgt: dict, layer: int) -> None:
    dense = dense_ffn(src, layer)
    kept_sets = set()
    for e in range(E):
        origins = neuron_origins(routed_expert(tgt, layer, e), dense)
        assert PARTIAL not in origins and origins.count(FRESH) == 16
        kept = [o for o in origins if o >= 0]
        assert len(set(kept)) == 16
        kept_sets.add(frozenset(kept))
    assert len(kept_sets) == E  # each expert draws its own neurons


def _check_virtual_group(src: dict, tgt: dict, layer: int) -> None:
    dense, h = dense_ffn(src, layer), 32
    g = FFN // h  # 8 shards; top-8 picks one whole group
    scale = g / (K * (1 / E))  # G / (top_k * w), w = 1/E without norm_topk_prob
    router = tgt[f"model.layers.{layer}.mlp.gate.weight"]
    for e in range(E):
        shard = dense.cols((e % g) * h, (e % g + 1) * h)
        expert = routed_expert(tgt, layer, e)
        assert torch.equal(expert.gate, shard.gate) and torch.equal(expert.up, shard.up)
        torch.testing.assert_close(expert.down, shard.down * scale, atol=0, rtol=1e-6)
        assert torch.equal(router[e], router[e // g * g])  # one router row per virtual group
    assert len({tuple(router[i * g].tolist()) for i in range(E // g)}) == E // g
    assert not shared_expert(tgt, layer).down.any()


def _check_random(src: dict, tgt: dict, layer: int) -> None:
    dense = dense_ffn(src, layer)
    for e in range(0, E, 7):
        assert set(neuron_origins(routed_expert(tgt, layer, e), dense)) == {FRESH}
    for key in (f"model.layers.{layer}.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert tgt[key].shape == src[key].shape and not torch.equal(tgt[key], src[key])


def _check_element(src: dict, tgt: dict, layer: int) -> None:
    """Element-wise re-init: exactly half of each expert matrix's elements still equal their dense neuron's."""
    dense = dense_ffn(src, layer)
    for e in range(E):
        expert = routed_expert(tgt, layer, e)
        owners = []
        for mine, theirs in ((expert.gate, dense.gate), (expert.up, dense.up), (expert.down.T, dense.down.T)):
            equal = (mine[:, None, :] == theirs[None]).sum(-1)  # [h, F] elements equal to each dense neuron
            best, owner = equal.max(-1)
            assert int(best.sum()) == mine.numel() - round_half_up(0.5 * mine.numel()), (layer, e)
            owners.append(torch.where(best > 0, owner, -1))
        both = (owners[0] >= 0) & (owners[1] >= 0) & (owners[2] >= 0)
        assert torch.equal(owners[0][both], owners[1][both]) and torch.equal(owners[0][both], owners[2][both])


@pytest.mark.parametrize(
    ("flags", "check"),
    [
        pytest.param(("--init", "drop-upcycling"), _check_drop_upcycling, id="drop-upcycling"),
        pytest.param(
            ("--init", "virtual-group", "--expert-size", "32", "--top-k", "8"), _check_virtual_group, id="virtual-group"
        ),
        pytest.param(("--init", "random"), _check_random, id="random"),
        pytest.param(("--init", "qwen2", "--reinit-granularity", "element"), _check_element, id="element"),
    ],
)
def test_other_inits_run_and_load_in_transformers(
    skewed_dense: Path, tmp_path: Path, flags: tuple[str, ...], check: Callable[[dict, dict, int], None]
) -> None:
    out = tmp_path / "out"
    upcycle(skewed_dense, out, *flags, eval_tokens=1024)
    ids = token_batch(seed=3)
    ours = our_logits(out, ids)
    theirs = hf_logits(out, ids, expect_class="Qwen2MoeForCausalLM")
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=TOL)
    step0 = report(out)["step0"]
    assert math.isfinite(step0["moe_loss"]) and step0["eval_tokens"] == 1024
    src, tgt = read_all(skewed_dense), read_all(out)
    for layer in range(LAYERS):
        check(src, tgt, layer)


# ---------------------------------------------------------------------------------------------- out dir, failures


def test_overwrite_replaces_an_existing_out_dir(debug_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    upcycle(debug_dense, out, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / REPORT).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or replaced dir left behind


def test_resume_of_a_complete_out_dir_is_refused(debug_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    upcycle(debug_dense, out)
    before = files_except_report(out)
    result = run_cli("upcycle", debug_dense, out, "--resume", "--no-progress", "--eval-tokens", "0")
    assert result.rc != 0 and "already complete" in result.err
    assert files_except_report(out) == before


def test_tensor_missing_from_file_and_index_fails_in_its_task(debug_dense: Path, tmp_path: Path) -> None:
    """The weight file and the index both lack a key, so only the task that needs it finds out."""
    src = tmp_path / "broken"
    shutil.copytree(debug_dense, src)
    (shard,) = src.glob("model-*.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    result = run_cli("upcycle", src, out, "--no-progress", "--eval-tokens", "0")
    assert result.rc != 0 and key in result.err
    assert not out.exists()


def test_negative_layers_per_task_is_refused(debug_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("upcycle", debug_dense, out, "--no-progress", "--eval-tokens", "0", "--layers-per-task", "-1")
    assert result.rc != 0
    assert not out.exists()


def test_llama_source_step0_quality(llama_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("upcycle", llama_dense, out, "--no-progress", "--eval-tokens", "1024")
    assert result.rc == 0, result.err
    assert "step0" in report(out)
