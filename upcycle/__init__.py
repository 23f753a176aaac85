"""Dense Qwen2 checkpoint -> fine-grained Qwen2-MoE checkpoint: pure split/init functions and a Ray job.

Imports moe_core only.
"""
