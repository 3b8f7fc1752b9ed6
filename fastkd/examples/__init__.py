"""Runnable examples: ``python -m fastkd.examples.digits`` distils on sklearn's digits."""
