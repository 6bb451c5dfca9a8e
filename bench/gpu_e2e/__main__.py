"""``python3 bench/gpu_e2e ...`` or ``python3 -m bench.gpu_e2e ...`` (from the repository root).

Run by path, this folder is first on ``sys.path``, not the repository: the repository goes first, so
``bench.gpu_e2e`` imports as a package here and in every spawned child (spawn hands its ``sys.path``
on). A spawned child re-runs this file as ``__mp_main__``, where nothing below the path runs.
"""

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

if __name__ == "__main__":
    from bench.gpu_e2e.cli import main

    sys.exit(main())
