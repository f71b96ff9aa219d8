"""The ``slidepipe`` console script: the CLI (:mod:`pipelines.cli`), started so that a command
which will run a LocalCluster does not wait for its workers' imports.

Importing the CLI takes 4-8 s on 2 cores (torch, timm, Dask), and a LocalCluster's forkserver
then imports torch and timm again (4-5 s) before it can fork a worker. For ``extract``, ``run``,
``demo`` and ``radiology extract`` without ``--scheduler`` this module starts the forkserver
first (:func:`pipelines.cluster.start_worker_forkserver`), so both imports run side by side and
the cluster is up about 1 s after the command starts it instead of 4-5 s
(``benchmarks/extract.py``). A configuration file that names a scheduler is not read here: the
forkserver then idles until the command exits.
"""

from __future__ import annotations

import sys

#: The commands, as typed after ``slidepipe``, that start a LocalCluster unless given a scheduler.
LOCAL_CLUSTER_COMMANDS = (("extract",), ("run",), ("demo",), ("radiology", "extract"))


def starts_local_cluster(args: list[str]) -> bool:
    """Whether the command line ``args`` (without the program name) runs a LocalCluster: one of
    ``LOCAL_CLUSTER_COMMANDS``, not asking for help and naming no ``--scheduler``."""
    if any(arg in ("--help", "-h") or arg.split("=")[0] == "--scheduler" for arg in args):
        return False
    return any(tuple(args[:len(command)]) == command for command in LOCAL_CLUSTER_COMMANDS)


def main() -> None:
    """Console-script entry point."""
    if starts_local_cluster(sys.argv[1:]):
        from .cluster import start_worker_forkserver

        start_worker_forkserver()
    from .cli import app

    app()


if __name__ == "__main__":
    main()
