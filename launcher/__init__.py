"""scripts/run: the service and the default models' build side by side (run.py). It composes training and service,
which never import each other (pyproject.toml [tool.importlinter]): hence a package of its own."""
