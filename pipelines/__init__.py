"""Orchestration around the slide and MIL layers: configs, archive discovery, stages, the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slidepipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+source"
