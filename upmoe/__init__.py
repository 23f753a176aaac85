"""upmoe: upcycle dense Qwen2 checkpoints into fine-grained Qwen2-MoE models, train and serve them on Ray."""
