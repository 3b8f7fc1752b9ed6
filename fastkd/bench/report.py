"""The benchmark's outputs: the table, the JSON and CSV files, the plots, the progress bar.

A run is a dict (see fastkd.bench.cli.run): metadata plus "results", one record per
case: loss, shape, x, x_name, params, fastkd_path ({op: backend}), variants ({name:
status, time_s, times_s, reps, peak_bytes, warmup_s, error, skipped}), speedup and
memory_ratio (reference variant / fastkd, measured side by side), floor (CUDA only).
"""
import csv
import json
import os
import sys
import textwrap
import time

from .measure import COMPILE_FAILED, FAILED, OK, OOM, TOO_SLOW

REFERENCES = ("eager", "compile")
_SHORT = {OOM: "OOM", COMPILE_FAILED: "no compile", TOO_SLOW: "too slow", FAILED: "failed"}


def ratio(num, den, least=0.0):
    """num / den, or None when either is missing or den is below least (noise)."""
    if num is None or den is None or den <= least or den == 0:
        return None
    return num / den


def add_ratios(record, min_memory_bytes):
    """speedup[ref] = time_ref / time_fastkd; memory_ratio[ref] = peak_ref / peak_fastkd
    (None below min_memory_bytes, where the measure is noise)."""
    fast = record["variants"].get("fastkd", {})
    record["speedup"], record["memory_ratio"] = {}, {}
    for ref in REFERENCES:
        other = record["variants"].get(ref)
        if other is None or not fast:
            continue
        record["speedup"][ref] = ratio(other["time_s"], fast["time_s"])
        peaks = (other["peak_bytes"], fast["peak_bytes"])
        both = None not in peaks and other["status"] == OK and fast["status"] == OK
        record["memory_ratio"][ref] = ratio(*peaks, least=min_memory_bytes) if both else None
    return record


def beyond(results):
    """Per loss and reference variant: the shapes where the reference ran out of memory,
    and which of them fastkd ran.

    {loss: {ref: {"oom": [shapes], "first_oom": shape, "fastkd_ran": [shapes], "largest": shape}}}
    in sweep order; "largest" is the biggest shape fastkd ran there (None if none). Only
    losses where a reference ran out of memory appear.
    """
    out = {}
    for rec in results:
        fast = rec["variants"].get("fastkd")
        for ref in REFERENCES:
            other = rec["variants"].get(ref)
            if other is None or other["status"] != OOM:
                continue
            entry = out.setdefault(rec["loss"], {}).setdefault(ref, {"oom": [], "first_oom": rec["shape"],
                                                                      "fastkd_ran": [], "largest": None})
            entry["oom"].append(rec["shape"])
            if fast is not None and fast["status"] == OK:
                entry["fastkd_ran"].append(rec["shape"])
                sizes = {r["shape"]: r["size"] for r in results if r["loss"] == rec["loss"]}
                entry["largest"] = max(entry["fastkd_ran"], key=sizes.get)
    return out


# --- the table ------------------------------------------------------------------------

def _num(v):
    """A number in 3-4 significant digits without exponent."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _time_cell(res):
    if res is None:
        return "-"
    if res["status"] != OK:
        return _SHORT.get(res["status"], res["status"]) + ("*" if res["skipped"] else "")
    return _num(res["time_s"] * 1e3)


def _memory_cell(res):
    if res is None:
        return "-"
    if res["status"] != OK:
        return _SHORT.get(res["status"], res["status"]) + ("*" if res["skipped"] else "")
    return "n/a" if res["peak_bytes"] is None else _num(res["peak_bytes"] / 2 ** 20)


def _ratio_cell(r):
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 100 else f"{r:.2f}x"


def path_cell(path):
    """The backends fastkd ran ({op: backend}), as the table's "fastkd path" shows them."""
    names = sorted(set(path.values()), key=["triton", "torch", "reference"].index)
    return "+".join("ref" if n == "reference" else n for n in names)


def _floor_cells(rec):
    floor = rec.get("floor") or {}
    return ("-" if floor.get("time_s") is None else _num(floor["time_s"] * 1e3),
            "-" if floor.get("fraction") is None else f"{100 * floor['fraction']:.0f}%")


TEXT_COLUMNS = 3  # loss, shape, fastkd path; the rest are numbers, right-aligned


def columns(variants, wide=False, floor=False):
    """[(header, cell)]: the table's columns, cell(record) -> text.

    The default table fits 120 characters: each variant's time, fastkd's speedup over
    each reference and its memory ratio against the eager one. wide adds each variant's
    peak MiB, the memory ratio against torch.compile and, where measured (CUDA), the floor:
    its time, the fraction of it fastkd reaches and the unit that bounds it.
    """
    refs = [r for r in REFERENCES if r in variants] if "fastkd" in variants else []
    cols = [("loss", lambda rec: rec["loss"]), ("shape", lambda rec: rec["shape"]),
            ("fastkd path", lambda rec: path_cell(rec["fastkd_path"]))]
    cols += [(f"{v} ms", lambda rec, v=v: _time_cell(rec["variants"].get(v))) for v in variants]
    cols += [(f"x {r}", lambda rec, r=r: _ratio_cell(rec["speedup"].get(r))) for r in refs]
    if wide:
        cols += [(f"{v} MiB", lambda rec, v=v: _memory_cell(rec["variants"].get(v))) for v in variants]
    cols += [(f"mem x {r}", lambda rec, r=r: _ratio_cell(rec["memory_ratio"].get(r)))
             for r in refs if wide or r == "eager"]
    if wide and floor:
        cols += [("floor ms", lambda rec: _floor_cells(rec)[0]), ("of floor", lambda rec: _floor_cells(rec)[1]),
                 ("bound", lambda rec: (rec.get("floor") or {}).get("bound") or "-")]
    return cols


def _line(cells, widths):
    return "  ".join(c.ljust(w) if i < TEXT_COLUMNS else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def _grouped(losses):
    """A blank line between losses where some loss has several rows."""
    return len(set(losses)) < len(losses)


def table(run, wide=False):
    """The comparison table as text, with its notes and the out-of-memory summary."""
    results = run["results"]
    cols = columns(run["settings"]["variants"], wide, any(rec.get("floor") for rec in results))
    rows = [[cell(rec) for _, cell in cols] for rec in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, (h, _) in enumerate(cols)]
    lines = [_line([h for h, _ in cols], widths), "  ".join("-" * w for w in widths)]
    previous, group = None, _grouped([rec["loss"] for rec in results])
    for rec, row in zip(results, rows):
        if group and previous is not None and rec["loss"] != previous:
            lines.append("")
        previous = rec["loss"]
        lines.append(_line(row, widths))
    return "\n".join(lines + ["", *legend(run, wide)])


def legend(run, wide=False):
    """The notes under the table, wrapped to 120 columns."""
    return [line for note in notes(run, wide) for line in textwrap.wrap(note, 119, subsequent_indent="  ")]


class StreamingTable:
    """The table printed as the run goes: its header at once, each row as its case ends.

    The widths are fixed before the first row, from the headers and from the labels known
    in advance (losses, shapes, fastkd paths); numbers get at least NUMBER_WIDTH.
    """
    NUMBER_WIDTH = 7

    def __init__(self, variants, known, wide=False, floor=False, stream=None):
        """known: (loss, shape, fastkd path) of every case to come."""
        self.cols = columns(variants, wide, floor)
        self.stream = stream or sys.stdout
        self.widths = [max(len(h), *(len(k[i]) for k in known)) if i < TEXT_COLUMNS and known
                       else max(len(h), self.NUMBER_WIDTH) for i, (h, _) in enumerate(self.cols)]
        self.previous, self.group = None, _grouped([k[0] for k in known])

    def _write(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()  # a line per case also when the output is a file

    def start(self):
        self._write(_line([h for h, _ in self.cols], self.widths))
        self._write("  ".join("-" * w for w in self.widths))

    def row(self, rec):
        if self.group and self.previous is not None and rec["loss"] != self.previous:
            self._write("")
        self.previous = rec["loss"]
        self._write(_line([cell(rec) for _, cell in self.cols], self.widths))


def notes(run, wide=False):
    out = [
        "ms: median forward+backward time; x eager/compile: the reference's time over fastkd's, measured "
        "side by side (above 1 = fastkd faster); mem x: the same for peak memory above the inputs "
        + ("(MiB)." if wide else "(each variant's MiB: --wide, and the JSON/CSV)."),
        "fastkd path: what the auto backend ran (ref = no fast path yet, so fastkd ~ the reference).",
        "OOM: out of memory (above --max-memory on CPU); too slow: a call took longer than "
        "--max-call-seconds; OOM*/too slow*: not run, it ran out of memory / was too slow at a smaller "
        "shape of the same loss; no compile: torch.compile failed on this loss; failed: the variant raised an "
        "error (its message is in the JSON and CSV).",
    ]
    if wide and run["device"]["type"] == "cuda":
        out.append("floor: the least time a correct kernel needs, the largest of: the bytes it must move (each "
                   "input and parameter read once, each gradient written once) over the measured copy bandwidth; "
                   "its matrix products on tensor cores at float32 accuracy (tf32x3: a third of the measured TF32 "
                   "rate; bf16/fp16 native) plus torch's convolutions at cuDNN's rate (TF32); its elementwise "
                   "O(N^3) work at the measured FMA rate. of floor: floor / fastkd time (docs/benchmarks.md).")
    over = beyond(run["results"])
    for loss, per_ref in over.items():
        for ref, entry in per_ref.items():
            ran = (f"fastkd ran {len(entry['fastkd_ran'])} of them, up to {entry['largest']}" if entry["largest"]
                   else "fastkd ran none of them")
            out.append(f"{loss}: {ref} ran out of memory at {len(entry['oom'])} shape(s) from "
                       f"{entry['first_oom']}; {ran}.")
    return out


def header(run):
    dev = run["device"]
    lines = [f"fastkd {run['fastkd']} benchmark on {dev['description']}",
             f"torch {run['torch']}, triton {run['triton'] or 'not installed'}, commit {(run['git_commit'] or 'unknown')[:12]}"
             + ("-dirty" if (run["git_commit"] or "").endswith("-dirty") else ""),
             f"sweep {run['settings']['sweep']}, dtype {run['settings']['dtype']}, "
             f"{run['settings']['threads']} CPU threads, memory cap "
             + (f"{run['settings']['max_memory'] / 2 ** 30:.1f} GiB" if run["settings"]["max_memory"] else "none")
             + ("; references compiled ahead on a spare core" if run["settings"].get("precompile") else "")]
    if run["settings"].get("launch"):
        lines.append("launch options set: " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v}" for k, v in options.items())
            for name, options in run["settings"]["launch"].items()))
    if dev.get("bandwidth_Bps"):
        rates = [f"{label} {dev[key] / 1e12:.0f}" for label, key in
                 (("TF32", "peak_tf32_flops"), ("bf16", "peak_bf16_flops"), ("FMA", "fma_flops")) if dev.get(key)]
        lines.append(f"measured copy bandwidth {dev['bandwidth_Bps'] / 1e9:.0f} GB/s, "
                     f"fp32 matmul peak {dev['peak_flops'] / 1e12:.1f} TFLOP/s"
                     + (f" ({', '.join(rates)})" if rates else "")
                     + ("" if dev.get("conv_tf32", True) else "; convolutions in IEEE float32"))
    return "\n".join(lines)


# --- files ------------------------------------------------------------------------------

def write_json(run, path):
    _parent(path)
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
        f.write("\n")


def csv_rows(run):
    """One row per case: every number, plus the run's device, versions and commit."""
    variants = run["settings"]["variants"]
    meta = {"device": run["device"]["description"], "torch": run["torch"], "triton": run["triton"],
            "fastkd": run["fastkd"], "git_commit": run["git_commit"], "dtype": run["settings"]["dtype"]}
    for rec in run["results"]:
        row = {"loss": rec["loss"], "shape": rec["shape"], "x_name": rec["x_name"], "x": rec["x"],
               "fastkd_path": path_cell(rec["fastkd_path"])}
        for v in variants:
            res = rec["variants"][v]
            row.update({f"{v}_status": res["status"], f"{v}_skipped": res["skipped"], f"{v}_time_s": res["time_s"],
                        f"{v}_reps": res["reps"], f"{v}_peak_bytes": res["peak_bytes"],
                        f"{v}_warmup_s": res["warmup_s"], f"{v}_error": res["error"]})
        for ref in REFERENCES:
            if ref in variants and "fastkd" in variants:
                row[f"speedup_vs_{ref}"] = rec["speedup"].get(ref)
                row[f"memory_ratio_vs_{ref}"] = rec["memory_ratio"].get(ref)
        floor = rec.get("floor") or {}
        row.update({f"floor_{key}": floor.get(key) for key in FLOOR_FIELDS})
        row.update(meta)
        yield row


FLOOR_FIELDS = ("bytes", "flops", "conv_flops", "vector_ops", "memory_s", "tensor_s", "vector_s", "time_s", "bound",
                "fraction")  # fastkd.bench.roofline.floor's figures, each a CSV column floor_<name>


def write_csv(run, path):
    _parent(path)
    rows = list(csv_rows(run))
    fields = list(rows[0]) if rows else ["loss", "shape"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _parent(path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


class MissingMatplotlib(RuntimeError):
    """--plot needs matplotlib."""


def _fixed(recs):
    """'D=512, fm1=32x16x16': the case parameters that are the same in every record."""
    params = [r.get("params") or {} for r in recs]
    out = []
    for key, value in params[0].items() if params else ():
        if all(p.get(key) == value for p in params):
            out.append(f"{key}=" + ("x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return ", ".join(out)


def plot_subtitle(run, recs):
    """dtype, CPU threads (on CPU) and the dimensions held fixed across the loss's sweep."""
    settings = run["settings"]
    parts = [f"dtype {settings['dtype']}"]
    if run["device"]["type"] == "cpu":
        threads = settings["threads"]
        parts.append(f"{threads} CPU thread{'s' if threads != 1 else ''}")
    fixed = _fixed(recs)
    if fixed:
        parts.append(f"fixed: {fixed}")
    return "; ".join(parts)


# Markers at the top of a plot's axes for sizes where a variant has no figure.
_FAILED_MARKS = {OOM: ("x", "out of memory"), TOO_SLOW: (">", "too slow")}


def write_plots(run, folder):
    """One PNG per loss (per divergence of FusedLinearDistillation): time and peak memory of
    each variant against the sweep variable.

    Losses swept over batch or classes get a log-log axis; feature-map losses, swept over
    layer shapes, one point per shape. Sizes where a variant ran out of memory or was too
    slow (or was not run after that) are marked at the top of the axes in its colour.
    The subtitle gives the dtype, the CPU threads and the fixed dimensions. Returns the
    files written.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        raise MissingMatplotlib("--plot needs matplotlib: pip install matplotlib "
                                "(or, in a clone of fastkd: pip install -e '.[bench]')") from None
    os.makedirs(folder, exist_ok=True)
    by_loss = {}
    for rec in run["results"]:  # FusedLinearDistillation: a plot per divergence
        divergence = rec["params"].get("divergence")
        by_loss.setdefault(f"{rec['loss']}-{divergence}" if divergence else rec["loss"], []).append(rec)
    written = []
    for loss, recs in by_loss.items():
        numeric = all(r["monotone"] for r in recs)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, scale, unit in ((axes[0], "time_s", 1e3, "forward+backward time (ms)"),
                                     (axes[1], "peak_bytes", 2.0 ** -20, "peak memory above inputs (MiB)")):
            for k, v in enumerate(run["settings"]["variants"]):
                color = f"C{k}"
                pts = [(r["x"] if numeric else i, r["variants"][v][key] * scale) for i, r in enumerate(recs)
                       if r["variants"][v]["status"] == OK and r["variants"][v][key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=v, color=color)
                for status, (marker, text) in _FAILED_MARKS.items():
                    xs = [r["x"] if numeric else i for i, r in enumerate(recs) if r["variants"][v]["status"] == status]
                    if xs:  # x in data coordinates, y in axes coordinates: at the top, one row per variant
                        ax.plot(xs, [0.96 - 0.05 * k] * len(xs), transform=ax.get_xaxis_transform(),
                                linestyle="none", marker=marker, markersize=8, color=color, clip_on=False,
                                label=f"{v}: {text}")
            ax.set_ylabel(unit)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            if numeric:
                ax.set_xscale("log")
                ax.set_xticks([r["x"] for r in recs])
                ax.set_xticklabels([str(r["x"]) for r in recs])
                ax.xaxis.set_minor_locator(ticker.NullLocator())
                ax.set_xlabel(recs[0]["x_name"])
            else:
                ax.set_xticks(range(len(recs)))
                ax.set_xticklabels([r["shape"] for r in recs], rotation=30, ha="right", fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{loss} on {run['device']['description']}\n{plot_subtitle(run, recs)}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(folder, f"{loss}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --- progress ---------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr: [####....] done/total elapsed  what runs now,
    redrawn in place on a terminal. Elsewhere it writes nothing: the table's rows, printed
    as each case ends, are the progress there."""

    def __init__(self, total, stream=None, enabled=True, width=24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()

    def _line(self, text):
        filled = self.width * self.done // max(self.total, 1)
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self.start:5.0f}s  {text}")

    def show(self, text):
        """What runs now (redrawn on a terminal only)."""
        if self.live:
            self.stream.write("\r" + self._line(text)[:119].ljust(119))
            self.stream.flush()

    def advance(self, text=""):
        """One more case done; text says which."""
        self.done += 1
        self.show(text)

    def close(self):
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
