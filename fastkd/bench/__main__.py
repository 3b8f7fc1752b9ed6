"""python -m fastkd.bench: see fastkd.bench.cli."""
from .cli import entry_point

entry_point()
