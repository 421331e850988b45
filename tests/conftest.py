import sys
from pathlib import Path

# make `import ldm` work without installing the package (plain `pytest` from any directory)
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
