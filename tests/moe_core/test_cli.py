"""`upmoe init` / `upmoe eval` end to end, with transformers computing the same loss as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moe_core.corpus import embedded_corpus
from moe_core.evaluate import token_blocks
from moe_core.tokenizer import Tokenizer
from upmoe.cli import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "debug-moe"
    assert main(["init", str(out), "--preset", "debug-moe", "--seed", "3"]) == 0
    return out


def test_init_writes_a_complete_hf_directory(moe_dir):
    names = {p.name for p in moe_dir.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((moe_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["architectures"] == ["Qwen2MoeForCausalLM"]
    assert cfg["num_experts"] == 64 and cfg["shared_expert_intermediate_size"] == 256


def test_init_refuses_existing_dir(moe_dir, capsys):
    assert main(["init", str(moe_dir)]) == 1
    assert "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_loss_equals_transformers(moe_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    text = embedded_corpus("eval", 20_000)
    data = tmp_path / "eval.txt"
    data.write_text(text)
    assert main(["eval", str(moe_dir), "--data", str(data), "--seq-len", "64", "--json"]) == 0
    ours = _last_json(capsys)

    model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(moe_dir)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == Tokenizer.from_dir(moe_dir).encode(text)
    blocks = token_blocks(ids, 64)
    with torch.no_grad():
        losses = [float(model(b[None], labels=b[None]).loss) for b in blocks]
    assert ours["tokens"] == blocks.numel()
    assert abs(ours["loss"] - sum(losses) / len(losses)) <= 1e-4


def test_eval_errors_are_clear(moe_dir, tmp_path, capsys):
    assert main(["eval", str(moe_dir), "--data", str(tmp_path / "nope.txt")]) == 1
    assert "nope.txt" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    assert main(["eval", str(moe_dir), "--data", str(short), "--seq-len", "64"]) == 1
    assert "fewer than one block" in capsys.readouterr().err
    assert main(["eval", str(moe_dir), "--seq-len", "100000"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 1
    assert "tokenizer.json" in capsys.readouterr().err or "config.json" in capsys.readouterr().err


def test_eval_of_a_dir_without_weights(moe_dir, tmp_path, capsys):
    broken = tmp_path / "noweights"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((moe_dir / name).read_bytes())
    assert main(["eval", str(broken)]) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "init" in out and "eval" in out and "bench" in out
    assert main(["evl"]) == 2
    assert "did you mean 'eval'" in capsys.readouterr().err


def test_eval_does_not_import_ray(moe_dir):
    code = (
        "import sys; from upmoe.cli import main; "
        f"main(['eval', {str(moe_dir)!r}, '--seq-len', '32', '--max-tokens', '256']); "
        "bad = [m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules]; "
        "print('IMPORTED', bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "IMPORTED []" in out
