"""Adversarial feature rows for the pairwise losses: the inputs on which distances, angles and
cosines formed from a Gram matrix lose their digits.

`rows(n, d, case, seed)` gives float64 (n, d) features; the cases are what a training run
produces, not benign normals:

spread      post-ReLU rows whose norms spread over 1..5000 (log-uniform), with one
            near-duplicate pair at gap/spread = 10**-gap_exp (gap_exp 2..7)
cluster     two tight clusters far apart: most pairs are far closer than the spread
duplicates  exact duplicate rows and a duplicate block of three
dead        all-zero rows (ReLU -> pool before any signal), beside live ones
offset      a large common offset (1e3) on small-spread rows
tiny, huge  the spread case scaled by 1e-4 / 1e4
"""
import torch

CASES = ("spread", "cluster", "duplicates", "dead", "offset", "tiny", "huge")


def rows(n, d, case, seed, gap_exp=4):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if case in ("spread", "tiny", "huge"):
        scale = 10 ** (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 3.7)
        x = torch.relu(randn(n, d)) * scale
        if n >= 2:
            spread = x.norm(dim=1).max()
            x[1] = x[0] + randn(d) * (spread * 10.0 ** -gap_exp / d ** 0.5)
        x = x * {"spread": 1.0, "tiny": 1e-4, "huge": 1e4}[case]
    elif case == "cluster":
        centres = randn(2, d) * 1000
        x = centres[torch.arange(n) % 2] + randn(n, d) * 10.0 ** -gap_exp * 1000
    elif case == "duplicates":
        x = randn(n, d)
        if n >= 3:
            x[n - 1] = x[0]
        if n >= 6:
            x[3] = x[4] = x[5]
    elif case == "dead":
        x = torch.relu(randn(n, d)) * 100
        x[:: max(2, n // 3)] = 0
    elif case == "offset":
        x = randn(n, d) + 1e3
    else:
        raise ValueError(f"unknown case {case!r}")
    return x
