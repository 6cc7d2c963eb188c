"""On-disk numba cache keyed by the whole ``kernels`` package, not one file.

numba invalidates a cached function when *its own* source file changes, but the interpreter in
:mod:`kernels.executor` inlines kernels from :mod:`kernels.ops` and tiles from
:mod:`kernels.simd`: edit only those and numba would keep serving the old machine code. This
module registers a cache locator (numba's extension point, also reachable through
``NUMBA_CACHE_LOCATOR_CLASSES``) whose freshness stamp is a hash of every module of this
package, so any change recompiles everything. It applies only to functions defined in this
package; every other numba function keeps numba's own locators.

The cache lives where numba would put it: ``NUMBA_CACHE_DIR`` if set, else
``kernels/__pycache__`` when writable, else numba's user-wide cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def package_stamp() -> str:
    """sha256 of every ``kernels/*.py`` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _in_package(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().parent == PACKAGE_DIR
    except OSError:
        return False


def install() -> bool:
    """Put the package-wide locators first in numba's list; returns False if numba lacks the hook."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba always has it in supported versions
        return False

    def find(name: str):  # numba < 0.62 spells these with a leading underscore
        return getattr(caching, name, None) or getattr(caching, f"_{name}", None)

    impl = find("CacheImpl")
    bases = [find(name) for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    if impl is None or None in bases or not hasattr(impl, "_locator_classes"):
        logger.warning("numba's cache locators changed; kernels fall back to per-file cache invalidation")
        return False
    if any(getattr(cls, "_hegate_kernels", False) for cls in impl._locator_classes):
        return True

    def package_locator(base):
        class PackageLocator(base):
            _hegate_kernels = True

            def get_source_stamp(self):
                return package_stamp()

            @classmethod
            def from_function(cls, py_func, py_file):
                if not _in_package(py_file):
                    return None
                return super().from_function(py_func, py_file)

        PackageLocator.__name__ = PackageLocator.__qualname__ = f"Kernels{base.__name__}"
        return PackageLocator

    impl._locator_classes = [package_locator(base) for base in bases] + list(impl._locator_classes)
    return True
