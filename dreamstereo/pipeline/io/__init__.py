"""Storage I/O of the generation job: inputs (manifests), outputs (local folders or S3)."""
