"""The ``upmoe`` command: a thin dispatcher that imports a subcommand's package only when it runs.

Keeping the table here (not in moe_core) lets ``upmoe eval`` start without importing Ray, and keeps moe_core
free of any upward dependency. Each subcommand lives next to the code it drives, as a pair of functions
``configure(parser)`` and ``run(args) -> int`` in that package's ``cli`` module.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Command:
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "init": Command("moe_core.cli", "create a randomly initialised model directory (config, weights, tokenizer)"),
    "eval": Command("moe_core.cli", "mean next-token cross-entropy of a model on a text file"),
    "upcycle": Command("upcycle.cli", "turn a dense Qwen2/Llama checkpoint into a fine-grained Qwen2-MoE (Ray job)"),
    "train": Command("moe_train.cli", "continue pretraining with Ray Train and expert parallelism"),
    "export": Command("moe_train.cli", "gather a training run's checkpoint into an HF directory"),
    "serve": Command("serve.cli", "deploy a model as an autoscaled OpenAI-compatible Ray Serve endpoint"),
    "submit": Command("upmoe.jobs", "submit upcycle/train/serve as a Ray job to a cluster and follow its logs"),
    "jobs": Command("upmoe.jobs", "list, inspect, follow or stop Ray jobs on a cluster"),
    "cluster": Command("upmoe.local_cluster", "start or stop a local multi-node Ray cluster with token auth"),
    "bench": Command("bench.cli", "benchmarks that print side-by-side tables with ratios"),
    "demo": Command("upmoe.demo", "run the end-to-end demo on the embedded default model and corpus"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: upmoe COMMAND [ARGS...]",
        "",
        "Turn dense Qwen2 checkpoints into fine-grained Qwen2-MoE models and run them on Ray.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run 'upmoe COMMAND --help' for a command's options."]
    return "\n".join(lines)


class _DefaultsWhenSet(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only for real defaults: None means "from the config file or computed"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(name: str) -> tuple[ModuleType, argparse.ArgumentParser]:
    """The subcommand's module and its full argument parser (also used to check manifests' entrypoints)."""
    module = importlib.import_module(COMMANDS[name].module)
    parser = argparse.ArgumentParser(
        prog=f"upmoe {name}", description=COMMANDS[name].summary, formatter_class=_DefaultsWhenSet
    )
    module.configure(name, parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hint = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"upmoe: unknown command {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""), file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module, parser = build_parser(name)
    args = parser.parse_args(rest)
    try:
        return int(module.run(name, args) or 0)
    except KeyboardInterrupt:
        print(f"upmoe {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing files, refused connections
        if os.environ.get("UPMOE_DEBUG"):
            raise
        print(f"upmoe {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
