"""Ray Serve OpenAI-compatible endpoint with expert-parallel replicas. Imports moe_core only."""
