"""The I/O floor: storage (local folders and S3), shards (writing, committing and reading), the sample
format, media files, disparity sidecars and previews. Imported by pipeline/, training/ and inference/;
imports none of them."""
