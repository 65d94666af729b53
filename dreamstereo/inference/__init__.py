"""Inference: stereo conversion, sparse-token (SASI) inpainting, evaluation."""
