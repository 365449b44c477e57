"""The architecture's rules, checked on the source tree: which package may import which, no import cycles
(pyproject.toml [tool.importlinter], run by import-linter), and no module over 350 lines."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model_repository", "service", "training")
MAX_LINES = 350


def test_import_contracts_hold():
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra: scripts/setup-venv dev")
    # The contracts name every rule and each broken one the imports that break it (printed on failure).
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_the_contracts_cover_every_package_and_forbid_the_heavy_sides():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == set(PACKAGES)
    forbidden = {c["source_modules"][0]: set(c["forbidden_modules"]) for c in config["contracts"]
                 if c["type"] == "forbidden"}
    assert {"training", "torch"} <= forbidden["service"] and "service" in forbidden["training"]
    assert {"torch", "fastapi", "training", "service"} <= forbidden["model_repository"]
    cycles = [c for c in config["contracts"] if c["type"] == "acyclic_siblings"]
    assert cycles and set(cycles[0]["ancestors"]) == set(PACKAGES)


def test_no_module_is_longer_than_350_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
               for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert len(lengths) > 30  # the packages were found
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
