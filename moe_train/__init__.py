"""Ray Train continued pretraining with expert parallelism, DeepSpeed ZeRO and W&B. Imports moe_core only."""
