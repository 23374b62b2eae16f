"""What `pip install .` puts in the wheel: every package of the source tree, under diekae_rag."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_installed_under_diekae_rag():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    where = {name: ROOT / folder for name, folder in setup["package-dir"].items()}
    found = set()
    for name, folder in where.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found, "the package-dir folders hold packages"
    assert found == listed, (f"pyproject.toml [tool.setuptools] packages lacks {sorted(found - listed)} "
                             f"or lists {sorted(listed - found)}: a wheel would leave them out")
    assert all(n == "diekae_rag" or n.startswith("diekae_rag.") for n in listed), "no bare top-level package"


def test_the_frameworks_are_extras_and_the_makefile_installs_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert not names & {"llama-index-core", "langchain-core", "langchain-community"}, "frameworks are extras"
    extras = project["optional-dependencies"]
    assert extras["llamaindex"] == ["llama-index-core"] and extras["langchain"] == ["langchain-core"]
    assert set(extras["all"]) == {"llama-index-core", "langchain-core"}
    assert "'.[all,test]'" in (ROOT / "Makefile").read_text()
