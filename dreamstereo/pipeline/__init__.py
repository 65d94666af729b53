"""The distributed generation job: Ray wrappers around the stages, and all storage I/O (``io/``)."""
