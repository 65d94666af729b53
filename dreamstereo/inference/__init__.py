"""Inference: SASI sparse-token DiT and the flow-matching sampler (issue 6)."""
