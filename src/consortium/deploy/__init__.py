"""Deploying a consortium between institutions: credentials, audit log, server and client.

Modules load on use (``consortium.deploy.provision`` needs ``cryptography``), so importing this
package costs nothing.
"""

import functools

__all__ = ["package_version"]


@functools.cache
def package_version() -> str:
    """The installed consortium's version (sites and the server compare theirs at Register)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("consortium")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "dev"
