"""The stress tests serve the tiny model of the server tests."""

from tests.entrypoints.conftest import tiny_model_dir  # noqa: F401 - a fixture, used by name
