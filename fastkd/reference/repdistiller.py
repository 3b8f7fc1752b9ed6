"""RepDistiller's math where it differs from the collection's (HobbitLong/RepDistiller,
``distiller_zoo/``): the oracle of ``fastkd.compat.repdistiller``.

Plain PyTorch, one line per formula, never optimised. Only what no other file of
fastkd.reference computes lives here; the rest of RepDistiller's losses are the
collection's math with RepDistiller's constants (see fastkd.compat.repdistiller).

Shapes: feature maps (B, C, H, W); feature vectors (B, D).
"""
import torch
import torch.nn.functional as F

from .ab import ab
from .nst import poly_kernel


def pool_pair(f_s, f_t):
    """RepDistiller's spatial match: the map with the larger H is adaptive-average-pooled to
    (h, h), h the other's H (a square, as RepDistiller's CIFAR/ImageNet maps are)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def channel_map(f, p):
    """normalize(mean_c f^p as (B, H W)): F.normalize, i.e. divided by max(||.||_2, 1e-12).

    RepDistiller's attention map (Attention.at) and factor (FactorTransfer.factor). Unlike
    the collection's AT (sum_c |f|^p / (||.|| + 1e-6)) it keeps f's sign for odd p.
    """
    return F.normalize(f.pow(p).mean(1).reshape(f.size(0), -1))


def attention(f_s, f_t, p):
    """Attention.at_loss: mean((channel_map(f_s, p) - channel_map(f_t, p))^2) after pool_pair."""
    f_s, f_t = pool_pair(f_s, f_t)
    return (channel_map(f_s, p) - channel_map(f_t, p)).pow(2).mean()


def factor_transfer(f_s, f_t, p1=2, p2=1):
    """FactorTransfer: mean|d| (p2 == 1) or mean(d^p2), d = channel_map(f_s, p1) - channel_map(f_t, p1),
    after pool_pair. (The collection's FT is the L1 of the normalised paraphraser factors.)"""
    f_s, f_t = pool_pair(f_s, f_t)
    d = channel_map(f_s, p1) - channel_map(f_t, p1)
    return d.abs().mean() if p2 == 1 else d.pow(p2).mean()


def correlation(f_s, f_t):
    """Correlation (RepDistiller's CC): mean_i sum_d |D_i,d| |D_{i+1},d|, D = f_s - f_t (B, D)."""
    delta = (f_s - f_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


def nst(f_s, f_t):
    """NSTLoss.nst_loss: the collection's NST with the teacher's self-term detached,
    mean K(F_t, F_t).detach() + mean K(F_s, F_s) - 2 mean K(F_s, F_t), after pool_pair."""
    f_s, f_t = pool_pair(f_s, f_t)
    f_s = F.normalize(f_s.reshape(f_s.size(0), f_s.size(1), -1), dim=2)
    f_t = F.normalize(f_t.reshape(f_t.size(0), f_t.size(1), -1), dim=2)
    return (poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
            - 2 * poly_kernel(f_s, f_t).mean())


def ab_weights(feat_num):
    """ABLoss's per-layer weights 2^(i - feat_num + 1), i = 0..feat_num-1 (the last layer 1)."""
    return [2 ** (i - feat_num + 1) for i in range(feat_num)]


def ab_losses(g_s, g_t, feat_num, margin=1.0):
    """ABLoss: [w_i * sum(AB_i) / B / 1000 * 3], sum(AB_i) the collection's AB summed
    (not averaged) over layer i's elements, B = g_s[0]'s batch."""
    bsz = g_s[0].shape[0]
    return [w * (ab(s, t, margin) * s.numel()) / bsz / 1000 * 3
            for w, s, t in zip(ab_weights(feat_num), g_s, g_t)]


def finite(x):
    """x with every non-finite entry set to 0 (KDSVD.removenan)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def svd(feat, n=1):
    """KDSVD.svd: the SVD of each sample's (H W, C) matrix (H = W), u (B, HW, r), s (B, r),
    v (B, C, r), non-finite entries zeroed; n > 0 keeps the first n singular triples, each
    L2-normalised over dim 1 (u and v per column, s over the n values)."""
    b, c, h = feat.shape[0], feat.shape[1], feat.shape[2]
    x = feat.reshape(b, c, h * h).transpose(-2, -1)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    u, s, v = finite(u), finite(s), finite(vh.transpose(-2, -1))
    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)
    return u, s, v


def align_rsv(a, b):
    """Each column of b takes the column of a with the largest |cosine| to it, signed:
    a @ M, M[i, j] = sign(a_i . b_j) where |a_i . b_j| is column j's maximum, else 0."""
    cosine = a.transpose(-2, -1) @ b
    top = cosine.abs().max(dim=1, keepdim=True).values
    mask = torch.where(top == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return a @ mask, b


def kdsvd(g_s, g_t, k=1):
    """KDSVD: for consecutive layers (i-1, i), sum over (B, C_i, C_{i-1}, k) of
    (R(v_s^i, v_s^{i-1}) - R(v_t^i, v_t^{i-1}).detach())^2 / B (non-finite terms 0),
    R(a, b)[.., c, c', j] = exp(-(a[c, j] - b[c', j])^2 / 8); v_t the teacher's first k right
    singular vectors, v_s the student's first k + 3 aligned to them (align_rsv), both scaled
    by the teacher's normalised singular values. Returns len(g_s) - 1 losses."""
    losses, v_sb, v_tb = [], None, None
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        _, s_t, v_t = svd(f_t, k)
        _, _, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        v_t = v_t * s_t.unsqueeze(1)
        v_s = v_s * s_t.unsqueeze(1)
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            losses.append(finite((s_rbf - t_rbf.detach()).pow(2)).sum())
        v_sb, v_tb = v_s, v_t
    bsz = g_s[0].shape[0]
    return [loss / bsz for loss in losses]
