"""Only what pyproject.toml cannot say: the status-mail and cover templates stay at the top of
the repository (templates/), and are installed inside the package (mailfax/templates), where
mailfax finds them beside its code in any prefix, venv or --target directory."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mailfax*"]), "mailfax.templates"],
      package_dir={"mailfax.templates": "templates"})
