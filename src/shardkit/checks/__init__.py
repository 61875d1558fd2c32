"""Checks of what exists: streaming equality, manifests, the architecture check."""
