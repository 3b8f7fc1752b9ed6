"""fastkd.bench: every loss, reference vs fastkd, time and peak memory side by side.

    python -m fastkd.bench --quick            # a first look (also: fastkd-bench --quick)
    python -m fastkd.bench --losses RKD,SP --json out.json --csv out.csv --plot plots/

cases    the losses and their shapes (shared with the pytest-benchmark suite in benchmarks/)
measure  how one case is run: warm-up, peak memory, round-robin timing (its docstring
         says exactly how time and memory are measured and how memory is capped)
report   the table, JSON, CSV, plots and the progress bar
roofline the floor: what each case cannot avoid moving and computing, at the GPU's measured
         rates (fma: the Triton kernel that measures its FMA rate)
cli      the command line
traffic  python -m fastkd.bench.traffic: the bytes each memory-bound loss's Triton path moves
         (Triton's interpreter counting its loads and stores) against the floor, without a GPU
global_batch  python -m fastkd.bench.global_batch: one rank's time and peak memory of the
         global-batch losses (global_batch=True) against the world size, at a fixed global batch
"""
