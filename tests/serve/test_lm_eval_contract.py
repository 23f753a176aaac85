"""The completions API against its most demanding real client: lm-evaluation-harness's ``local-completions``.

lm-eval scores a multiple-choice task by asking for the logprobs of each (context, continuation) pair: batched
token-id prompts with ``echo: true, logprobs: 1, max_tokens: 1, temperature: 0``, reading the continuation's
logprobs as ``token_logprobs[ctxlen:-1]`` (so the one generated token must be listed even when it is a stop
token). The test defines a small task from a local JSONL file (no hub), runs lm-eval's own evaluator against the
endpoint, and checks every request's continuation logprob, and the task's accuracy, against transformers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from serve_testlib import running_endpoint

MODEL = "contract-moe"
TASK = "upmoe_contract_mc"
DOCS = 16
CHOICES = 4


def _write_task(root: Path) -> Path:
    """A multiple-choice task over a JSONL file: a short question, four one-or-two-word answers."""
    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "seven", "time"]
    docs = [
        {
            "question": f"Question: which word goes with {rng.choice(words)}?\nAnswer:",
            "choices": [" " + " ".join(rng.sample(words, rng.randint(1, 2))) for _ in range(CHOICES)],
            "answer": rng.randrange(CHOICES),
        }
        for _ in range(DOCS)
    ]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


def _continuation_logprob(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        logprobs_TV = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    return float(logprobs_TV[positions, torch.tensor(continuation)].sum())


@pytest.mark.slow
def test_lm_eval_local_completions_scores_match_transformers(serve_port, moe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    import lm_eval
    import transformers
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    options = {"model_dir": str(moe_dir), "model_name": MODEL, "max_seq_len": 256, "max_batch_size": 4}
    with running_endpoint(serve_port, options) as url:
        model_args = {
            "model": MODEL,
            "base_url": f"{url}/v1/completions",
            "tokenizer": str(moe_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 2,
            "batch_size": 2,  # two token-id prompts per request: the endpoint's prompt lists
            "max_retries": 1,
        }
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(_write_task(tmp_path)), include_defaults=False),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    encoder = get_model("local-completions")(**{**model_args, "base_url": None})  # lm-eval's own tokenisation
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    samples = out["samples"][TASK]
    assert len(samples) == DOCS
    diffs, correct = [], 0
    for sample in samples:
        scores = []
        for (context, continuation), resps in zip(sample["arguments"], sample["resps"], strict=True):
            served = resps[0][0]
            reference = _continuation_logprob(hf, *encoder._encode_pair(context, continuation))
            diffs.append(abs(served - reference))
            scores.append(reference)
        correct += max(range(CHOICES), key=scores.__getitem__) == sample["target"]
    accuracy = out["results"][TASK]["acc,none"]
    print(f"lm-eval contract: {len(diffs)} requests, max |logprob diff| {max(diffs):.2e}, acc {accuracy}")
    assert len(diffs) == DOCS * CHOICES and max(diffs) < 1e-4
    assert accuracy == pytest.approx(correct / DOCS)
