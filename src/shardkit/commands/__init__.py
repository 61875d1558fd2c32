"""The Python API behind each CLI command: one module per command."""
