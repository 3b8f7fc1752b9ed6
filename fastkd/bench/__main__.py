"""python -m fastkd.bench: see fastkd.bench.cli."""
import sys

from .cli import main

sys.exit(main())
