"""Finding catalogue files inside installed pip packages, without importing them.

Several catalogue packages are installed with --no-deps, so importing them would fail; find_spec does not.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from crosslm.errors import CatalogueError


def package_path(package: str, relpath: str, install: str, what: str) -> Path:
    """`relpath` inside `package`'s folder in site-packages; CatalogueError with the install command."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CatalogueError(
            f"{what} needs the package '{package}', which is not installed. Install it with: {install}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise CatalogueError(
            f"{what}: '{path}' is missing from package '{package}'; reinstall with: {install}"
        )
    return path
