"""A child process of ``benchmarks/extract.py``: ``python _extract_child.py SPEC`` (JSON).

The children that start a LocalCluster (the session and the fresh runs) start the way the
``slidepipe`` console script starts ``slidepipe extract`` (:mod:`pipelines.launch`): the
workers' forkserver first, then the imports (``_extract_modes.py``: torch, timm, slidepipe)
while it imports the same. The (b) children start no cluster and only import.
"""

from __future__ import annotations

import json
import sys

from pipelines.cluster import start_worker_forkserver


def main() -> int:
    """Run the child ``sys.argv[1]`` describes (see ``_extract_modes``)."""
    spec = json.loads(sys.argv[1])
    if spec["mode"] != "ceiling":
        start_worker_forkserver()
    from _extract_modes import child_main

    return child_main(spec)


if __name__ == "__main__":
    sys.exit(main())
