"""Helpers for the ``upmoe upcycle`` tests: run the CLI in-process, build dense sources, read checkpoints, and
recover from an output checkpoint alone which dense neuron (if any) each expert neuron is.

The neuron analysis is independent of upcycle.recipe: it only compares tensors of the source and the output.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_core.checkpoint_io import TensorReader
from tests.testlib import CliResult, run_cli  # noqa: F401  (re-exported for the upcycle tests)

# The tokenizer files `upmoe init` writes; copied next to transformers-made sources so evaluation works.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# Shape of the `debug` preset (and of the transformers-made sources): hidden, FFN width, layers, vocab
# (attention: 2 query heads of 32, 1 KV head).
HIDDEN, FFN, LAYERS, VOCAB = 64, 256, 2, 1024
REPORT = "upcycle_report.json"

# Fresh (re-drawn) neuron, and a neuron whose gate row matches a dense neuron but whose up/down do not.
FRESH, PARTIAL = -1, -2


def upcycle(source: Path, out: Path, *flags: str | Path, eval_tokens: int = 0) -> CliResult:
    """``upmoe upcycle SOURCE OUT FLAGS`` in-process; asserts success and returns the captured output."""
    result = run_cli("upcycle", source, out, "--no-progress", "--json", "--eval-tokens", str(eval_tokens), *flags)
    assert result.rc == 0, f"upcycle failed (rc {result.rc}):\n{result.err[-3000:]}\n{result.out[-2000:]}"
    return result


def copy_tokenizer(from_dir: Path, to_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (from_dir / name).exists():
            shutil.copyfile(from_dir / name, to_dir / name)


def read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    with TensorReader(model_dir) as reader:
        return {k: reader.get(k).clone() for k in reader.keys()}


def report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


def files_except_report(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.name != REPORT}


# ---------------------------------------------------------------------------------------------- neurons


@dataclass
class Block:
    """A SwiGLU block: gate [F, D], up [F, D], down [D, F]; neuron j = (gate[j], up[j], down[:, j])."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def cols(self, start: int, stop: int) -> Block:
        return Block(self.gate[start:stop], self.up[start:stop], self.down[:, start:stop])


def dense_ffn(tensors: dict[str, torch.Tensor], layer: int) -> Block:
    p = f"model.layers.{layer}.mlp"
    return Block(*(tensors[f"{p}.{n}.weight"].float() for n in ("gate_proj", "up_proj", "down_proj")))


def routed_expert(tensors: dict[str, torch.Tensor], layer: int, e: int) -> Block:
    p = f"model.layers.{layer}.mlp.experts.{e}"
    return Block(*(tensors[f"{p}.{n}.weight"].float() for n in ("gate_proj", "up_proj", "down_proj")))


def shared_expert(tensors: dict[str, torch.Tensor], layer: int) -> Block:
    p = f"model.layers.{layer}.mlp.shared_expert"
    return Block(*(tensors[f"{p}.{n}.weight"].float() for n in ("gate_proj", "up_proj", "down_proj")))


def neuron_origins(expert: Block, dense: Block) -> list[int]:
    """Per expert neuron: the dense neuron it equals whole (gate row, up row, down column), FRESH if it
    equals no dense neuron in any of its three parts, PARTIAL otherwise (some part matches, not all).

    The dense neuron is found by its gate row, then the up row and down column of that index are checked.
    """
    gate_eq = (expert.gate[:, None, :] == dense.gate[None]).all(-1)  # [h, F]
    up_eq = (expert.up[:, None, :] == dense.up[None]).all(-1)
    down_eq = (expert.down.T[:, None, :] == dense.down.T[None]).all(-1)
    origins = []
    for j in range(expert.width):
        candidates = gate_eq[j].nonzero().flatten().tolist()
        whole = [i for i in candidates if up_eq[j, i] and down_eq[j, i]]
        if whole:
            origins.append(whole[0])
        elif not (gate_eq[j].any() or up_eq[j].any() or down_eq[j].any()):
            origins.append(FRESH)
        else:
            origins.append(PARTIAL)
    return origins


def fresh_values(expert: Block, origins: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The re-drawn neurons' gate rows, up rows and down columns, flattened."""
    idx = torch.tensor([j for j, o in enumerate(origins) if o == FRESH], dtype=torch.long)
    return expert.gate[idx].flatten(), expert.up[idx].flatten(), expert.down[:, idx].flatten()


def round_half_up(x: float) -> int:
    return int(x + 0.5)


# ---------------------------------------------------------------------------------------------- models


def token_batch(seed: int = 0, batch: int = 2, length: int = 24, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def our_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from moe_core.loading import load_model

    return load_model(model_dir).eval()(ids).logits.float()


@torch.no_grad()
def hf_logits(model_dir: Path, ids: torch.Tensor, expect_class: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if expect_class is not None:
        assert type(model).__name__ == expect_class
    return model(ids).logits.float()
