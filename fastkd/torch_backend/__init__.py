"""fastkd's algorithms written with torch ops: the CPU path."""
