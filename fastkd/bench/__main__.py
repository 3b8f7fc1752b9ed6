"""python -m fastkd.bench: see fastkd.bench.cli."""
from .cli import entry_point

if __name__ == "__main__":  # not again in fastkd.bench.precompile's spawned process
    entry_point()
