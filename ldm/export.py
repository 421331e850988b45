"""Export a model: ``python -m ldm.export <checkpoint> --format diffusers|single-file|ldm --out PATH [--merge-lora F:S]``.

The same command as ``python -m ldm.cli.export`` and ``ldm-export`` (the work is in ``ldm.cli.export``); this module
gives it the short name ``python -m ldm.export``, next to ``python -m ldm.evaluate``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from ldm.cli.export import main

    sys.exit(main(prog="python -m ldm.export"))
