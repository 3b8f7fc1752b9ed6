"""Pieces shared by the fast backends (fastkd.torch_backend and the Triton Functions in
fastkd.autograd): nothing here depends on either."""
import functools

import torch


def first_order(backward):
    """Mark a hand-written autograd backward as first order only.

    Under create_graph=True (grad mode on during backward) it raises a clear error instead of
    returning gradients without a graph, which would drop the op's own second-order part
    without a word (torch's once_differentiable refuses only when the incoming gradient
    itself requires grad). Without create_graph the backward runs as written.
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            name = type(ctx).__name__.removesuffix("Backward")
            raise RuntimeError(
                f"fastkd's {name} has a first-order backward only: it cannot be differentiated "
                f"twice (create_graph=True). Use fastkd.use_backend('reference') for higher "
                f"derivatives.")
        return backward(ctx, *grads)
    return wrapper
