"""Inference: SASI sparse-token DiT, the flow-matching sampler, stereo conversion and evaluation."""
