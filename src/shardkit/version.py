"""The version, written once: the package, `shardkit -V` and pyproject.toml (dynamic) read it here."""

__version__ = "0.1.0"
