"""Shared fixtures: tiny real models (fixtures/models.py) and the offline
pretrained ones (fixtures/offline.py)."""

pytest_plugins = ["fixtures.models", "fixtures.offline"]
