"""The package version (kept with pyproject.toml's): hosts that must run the same build compare it."""

VERSION = "0.1.0"
