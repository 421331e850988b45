"""LoRA tools: ``python -m ldm.lora {merge,resize,extract} ...`` (see ``ldm.cli.lora``, where the command is, and
``ldm.cli.lora_tools``, where the work is), next to ``python -m ldm.export`` and ``python -m ldm.evaluate``."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from ldm.cli.lora import main

    sys.exit(main(prog="python -m ldm.lora"))
