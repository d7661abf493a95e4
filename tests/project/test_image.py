"""The project image carries every package the project installs (a package left out of the
Dockerfile would install as a missing module in every task and pod)."""
import re
import tomllib

from tests.support import ROOT


def test_the_dockerfile_copies_every_installed_package():
    # Given the packages pyproject.toml installs
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {name.rstrip("*") for name in include}
    # When the Dockerfile's COPY lines are read
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    # Then each package is copied into the image, and each is a real folder of the repo
    assert packages <= copied, f"missing from the Dockerfile: {sorted(packages - copied)}"
    assert all((ROOT / name / "__init__.py").is_file() for name in packages)
