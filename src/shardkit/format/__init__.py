"""The safetensors format: header rules, exact JSON, dtype encodings. Imports nothing above it."""
