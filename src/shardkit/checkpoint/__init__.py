"""Checkpoints: discover the shards, read the index, cross-check them before any write."""
