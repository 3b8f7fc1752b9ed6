"""Triton's interpreter, without its repeated patching of triton.language inside a launch.

The interpreter patches triton.language's builtins (inspect.getmembers over the package,
about a millisecond) once per launch, and again on every call of a @triton.jit device
function inside the kernel, although the launch's patch is still in place. The kernels call
their device functions once per program instance and loop iteration, so under the
interpreter that re-patching was about a quarter of the kernel tests' time. install() makes a
device function's patch a no-op where the running launch has already patched every
triton.language module the function sees (triton.language by the launch, triton.language.core
by the first call of one of its own functions, tl.sum's for instance); the patches themselves,
and the launch's undoing of its own after the grid, are Triton's. Nothing changes where Triton's interpreter is laid out otherwise.

It also reduces a tl.reduce with a @triton.jit combine function as a tree of vectorized
calls (_tree_reduce), not one Python call per element.
"""
import inspect
import os

_installed = False


def install():
    global _installed
    if _installed or os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        launch, patch_lang, empty_scope = (interpreter.GridExecutor.__call__, interpreter._patch_lang,
                                           interpreter._LangPatchScope)
    except (ImportError, AttributeError):
        return
    _installed = True
    seen = {}  # function -> the triton.language modules its globals hold

    def langs_of(fn):
        if fn not in seen:
            seen[fn] = frozenset(v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[fn]

    patched = []  # per running launch: None until its own patch, then the modules it patched

    def patch_once(fn):
        langs = langs_of(fn)
        if patched and patched[-1] is not None and langs <= patched[-1]:
            return empty_scope()  # a device function inside the launch: already patched
        scope = patch_lang(fn)
        if patched:  # the launch's own patch, or a device function's (which Triton never undoes)
            patched[-1] = langs | (patched[-1] or frozenset())
        return scope

    def run(self, *args, **kwargs):
        patched.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = run
    if hasattr(interpreter, "ReduceOps") and hasattr(interpreter.ReduceOps, "generic_reduce"):
        interpreter.ReduceOps.generic_reduce = _tree_reduce


def _tree_reduce(self, input):
    """tl.reduce with a @triton.jit combine function (the double-float kernels' dd_add, a
    lexicographic max), as a tree: the combine applied to whole halves of the reduced axis at
    a time, log2(n) vectorized calls where Triton's interpreter calls it once per element in
    Python (seconds for a 1024-wide block). A GPU also reduces in a tree; the combine
    functions are elementwise, so each call sees the blocks it would see per element."""
    import numpy as np
    import triton.language as tl

    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    input_shape = input[0].handle.data.shape
    dtypes = [arg.dtype for arg in input]
    data = [np.moveaxis(arg.handle.data, axis, -1) for arg in input]
    while data[0].shape[-1] > 1:
        half = data[0].shape[-1] // 2
        left = [self.to_tensor(np.ascontiguousarray(d[..., :half]), t) for d, t in zip(data, dtypes)]
        right = [self.to_tensor(np.ascontiguousarray(d[..., half:2 * half]), t) for d, t in zip(data, dtypes)]
        out = self.combine_fn.fn(*left, *right)
        out = out if isinstance(out, tuple) else (out,)
        data = [np.concatenate([np.broadcast_to(o.handle.data if isinstance(o, tl.core.tensor) else o,
                                                d[..., :half].shape).astype(d.dtype), d[..., 2 * half:]], axis=-1)
                for o, d in zip(out, data)]
    ret = []
    for d, t in zip(data, dtypes):
        d = d[..., 0]
        if self.keep_dims:
            if original_axis is not None:
                d = np.expand_dims(d, axis)
            else:
                for _ in range(len(input_shape)):
                    d = np.expand_dims(d, 0)
        elif original_axis is None:
            d = d.item()
        ret.append(self.to_tensor(d, t))
    return ret
