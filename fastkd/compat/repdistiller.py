"""Drop-in for RepDistiller's losses (HobbitLong/RepDistiller: ``distiller_zoo`` and ``crd``).

    from fastkd.compat.repdistiller import *      # was: from distiller_zoo import *
                                                  #      from crd.criterion import CRDLoss

Every class has RepDistiller's name, constructor and forward arguments, return type (a
list of losses where RepDistiller returns one, a (1,)-shaped tensor where it does), what
it detaches, its constants and epsilons, and its parameter and buffer names (a
RepDistiller state_dict loads with strict=True, and the reverse). Where the math is one of
fastkd's losses the call runs on ``fastkd.functional`` (the fused kernels on CUDA,
fastkd's torch algorithms on the CPU) with RepDistiller's constants; where RepDistiller's
math is its own it runs on ``fastkd.reference.repdistiller``:

==============  =====================================================================
DistillKL       fastkd.functional.soft_target(y_s, y_t, T)
HintLoss        fastkd.functional.hint
Attention       fastkd.functional.at(f_s, f_t, p, normalize=True) for even p (F.normalize of
                mean_c f^p, as RepDistiller's); other p (f^p keeps f's sign, or is NaN
                for negative f) reference.repdistiller.attention
Similarity      fastkd.functional.sp, each loss shaped (1,)
Correlation     reference.repdistiller.correlation (not the collection's CC)
RKDLoss         fastkd.functional.rkd(f_s, f_t.detach(), w_d, w_a)
PKT             fastkd.functional.pkt_cos_sim(f_s, f_t, eps=1e-7)
NSTLoss         fastkd.functional.nst (teacher without grad; else the reference, whose
                teacher self-term is detached)
FSP             fastkd.functional.fsp on consecutive maps
FactorTransfer  fastkd.functional.ft of the channel means of f^p1 (p2 == 1); for p2 == 2 and
                even p1 fastkd.functional.at(f_s, f_t, p1, normalize=True) (Attention's
                loss); else the reference
ABLoss          fastkd.functional.ab, summed, weighted 2^(i - feat_num + 1) / B * 3e-3
VIDLoss         fastkd.functional.vid with eps=1e-5, parameter log_scale
KDSVD           reference.repdistiller.kdsvd
CRDLoss         fastkd.functional.crd_contrast on memory_v2 / memory_v1
==============  =====================================================================

Before any fastkd call, the larger of two maps is average-pooled to the other's (H, H),
as RepDistiller does. Bad input raises TypeError / ValueError naming the argument, as the
rest of fastkd (RepDistiller silently truncates unequal lists of maps; here that raises).
CRDLoss runs on any device: its memory follows the module (``.to()``), the negatives are
drawn on the memory's device.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF

from .. import checks
from .. import functional as F
from ..reference import crd as _crd
from ..reference import repdistiller as ref
from ..reference.nst import poly_kernel as _poly_kernel
from ..reference.rkd import pdist as _pdist

__all__ = ["DistillKL", "HintLoss", "Attention", "Similarity", "Correlation", "RKDLoss", "PKT",
           "NSTLoss", "FSP", "FactorTransfer", "ABLoss", "VIDLoss", "KDSVD", "CRDLoss"]

# RepDistiller's constants.
PKT_EPS = 1e-7
VID_EPS = 1e-5
CRD_EPS = 1e-7


def _even(p):
    """Whether f^p is |f|^p, which fastkd's AT computes: p an even integer > 0 (RepDistiller's
    default 2)."""
    return isinstance(p, (int, float)) and p > 0 and p % 2 == 0


def _pairs(g_s, g_t, ndim=4):
    """The (student, teacher) pairs of two equally long sequences of tensors."""
    for seq, name in ((g_s, "g_s"), (g_t, "g_t")):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
        if not seq:
            raise ValueError(f"{name} must not be empty")
    if len(g_s) != len(g_t):
        raise ValueError(f"g_s and g_t must hold as many maps, got {len(g_s)} and {len(g_t)}")
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        checks.tensor(s, f"g_s[{i}]", ndim=ndim)
        checks.tensor(t, f"g_t[{i}]", ndim=ndim)
        checks.same_device(**{f"g_s[{i}]": s, f"g_t[{i}]": t})
        checks.same_batch(s, t, f"g_s[{i}]", f"g_t[{i}]")
    return list(zip(g_s, g_t))


def _maps(f_s, f_t, name_s="f_s", name_t="f_t"):
    checks.feature_map(f_s, name_s)
    checks.feature_map(f_t, name_t)
    checks.same_device(**{name_s: f_s, name_t: f_t})
    checks.same_batch(f_s, f_t, name_s, name_t)


def _pool(f_s, f_t, name_s="f_s", name_t="f_t"):
    """Checked maps, the larger pooled to the other's (H, H) (RepDistiller's match)."""
    _maps(f_s, f_t, name_s, name_t)
    return ref.pool_pair(f_s, f_t)


class DistillKL(nn.Module):
    """KL(softmax(y_t / T) || softmax(y_s / T)) summed, * T^2 / B; y_s, y_t (B, K) logits.

    fastkd.functional.soft_target: the same loss (batchmean is the sum / B)."""

    def __init__(self, T):
        super().__init__()
        self.T = checks.argument("T", T)

    def forward(self, y_s, y_t):
        return F.soft_target(y_s, y_t, self.T)


class HintLoss(nn.Module):
    """FitNets: mse(f_s, f_t), same shapes (fastkd.functional.hint). ``crit`` is kept."""

    def __init__(self):
        super().__init__()
        self.crit = nn.MSELoss()

    def forward(self, f_s, f_t):
        return F.hint(f_s, f_t)


class Attention(nn.Module):
    """AT: forward(g_s, g_t) -> [at_loss(f_s, f_t) per pair].

    at_loss = mean((at(f_s) - at(f_t))^2) (B, H W), at(f) = normalize(mean_c f^p) (F.normalize,
    eps 1e-12), after pooling the larger map to the other's (H, H). Channels may differ.

    Even p (f^p = |f|^p): fastkd.functional.at with normalize=True (fastkd's AT kernels, one
    pass over each map); other p: fastkd.reference.repdistiller.attention.
    """

    def __init__(self, p=2):
        super().__init__()
        self.p = checks.argument("p", p)

    def forward(self, g_s, g_t):
        return [self.at_loss(f_s, f_t) for f_s, f_t in _pairs(g_s, g_t)]

    def at_loss(self, f_s, f_t):
        if _even(self.p):
            f_s, f_t = _pool(f_s, f_t)
            return F.at(f_s, f_t, self.p, normalize=True)
        _maps(f_s, f_t)
        return ref.attention(f_s, f_t, self.p)

    def at(self, f):
        return ref.channel_map(f, self.p)


class Similarity(nn.Module):
    """SP: forward(g_s, g_t) -> [similarity_loss per pair], each of shape (1,):
    sum((G^_t - G^_s)^2) / B^2, G^ = normalize(flat(f) flat(f)^T, dim=1) (fastkd.functional.sp)."""

    def forward(self, g_s, g_t):
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in _pairs(g_s, g_t, ndim=None)]

    def similarity_loss(self, f_s, f_t):
        return F.sp(f_s, f_t).reshape(1)


class Correlation(nn.Module):
    """RepDistiller's CC: mean_i sum_d |D_i| |D_{i+1}|, D = f_s - f_t, f_* (B, D) (the embedded
    features train_student.py passes). Not the collection's CC (a kernel-Gram mse)."""

    def forward(self, f_s, f_t):
        checks.tensor(f_s, "f_s", min_ndim=2)
        checks.tensor(f_t, "f_t", min_ndim=2)
        checks.same_device(f_s=f_s, f_t=f_t)
        checks.same_shape(f_s, f_t, "f_s", "f_t")
        return ref.correlation(f_s, f_t)


class RKDLoss(nn.Module):
    """RKD: w_d * distance + w_a * angle on flat(f_s), flat(f_t) (B, D_*), B >= 2; the teacher's
    distances and angles are constants (no grad to f_t), as RepDistiller's torch.no_grad blocks.

    fastkd.functional.rkd: distances and angles from the Gram matrix, O(B^2) memory.
    """

    def __init__(self, w_d=25, w_a=50):
        super().__init__()
        self.w_d = checks.argument("w_dist", w_d)
        self.w_a = checks.argument("w_angle", w_a)

    def forward(self, f_s, f_t):
        checks.tensor(f_s, "f_s", min_ndim=1)
        checks.tensor(f_t, "f_t", min_ndim=1)
        student = f_s.reshape(f_s.shape[0], -1)
        teacher = f_t.reshape(f_t.shape[0], -1).detach()
        return F.rkd(student, teacher, self.w_d, self.w_a)

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        return _pdist(e, squared, eps)


class PKT(nn.Module):
    """PKT: mean P_t log((P_t + eps) / (P_s + eps)), P = C' / rowsum(C'), C' = (x^ x^T + 1) / 2,
    x^ = x / (||x|| + eps), eps = 1e-7; f_* (B, D_*) (fastkd.functional.pkt_cos_sim)."""

    def forward(self, f_s, f_t):
        return self.cosine_similarity_loss(f_s, f_t)

    @staticmethod
    def cosine_similarity_loss(output_net, target_net, eps=PKT_EPS):
        return F.pkt_cos_sim(output_net, target_net, eps)


class NSTLoss(nn.Module):
    """NST: forward(g_s, g_t) -> [nst_loss per pair]: mean K(F_t, F_t).detach() + mean K(F_s, F_s)
    - 2 mean K(F_s, F_t), F = normalize(f as (B, C, HW), dim=2), K(a, b) = (b_j . a_i)^2, after
    pooling the larger map to the other's (H, H).

    fastkd.functional.nst (Gram products, no (B, C, C, HW) tensor) when the teacher map needs no
    gradient (RepDistiller's scripts detach it); otherwise the reference, so that the
    teacher's self-term stays detached.
    """

    def forward(self, g_s, g_t):
        return [self.nst_loss(f_s, f_t) for f_s, f_t in _pairs(g_s, g_t)]

    def nst_loss(self, f_s, f_t):
        _maps(f_s, f_t)
        if f_t.requires_grad and torch.is_grad_enabled():
            return ref.nst(f_s, f_t)
        f_s, f_t = ref.pool_pair(f_s, f_t)
        return F.nst(f_s, f_t)

    def poly_kernel(self, a, b):
        return _poly_kernel(a, b)


class FSP(nn.Module):
    """FSP: forward(g_s, g_t) -> [mse(G_s^i, G_t^i) for consecutive maps i, i + 1], G^i the
    flow matrix mean_hw(g[i] g[i+1]) (the larger map of the two pooled to the other's (H, H)).

    s_shapes, t_shapes: the maps' shapes; student and teacher channels must be equal.
    fastkd.functional.fsp per pair.
    """

    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"unequal length of feat list: s_shapes {len(s_shapes)}, "
                             f"t_shapes {len(t_shapes)}")
        s_c = [s[1] for s in s_shapes]
        t_c = [t[1] for t in t_shapes]
        if np.any(np.asarray(s_c) != np.asarray(t_c)):
            raise ValueError(f"num of channels not equal (error in FSP): student {s_c}, teacher {t_c}")

    def forward(self, g_s, g_t):
        pairs = _pairs(g_s, g_t)
        losses = []
        for i in range(len(pairs) - 1):
            (s1, t1), (s2, t2) = pairs[i], pairs[i + 1]
            s1, s2 = ref.pool_pair(s1, s2)
            t1, t2 = ref.pool_pair(t1, t2)
            losses.append(F.fsp(s1, s2, t1, t2))
        return losses

    @staticmethod
    def compute_loss(s, t):
        return F.hint(s, t)

    @staticmethod
    def compute_fsp(g):
        out = []
        for bot, top in zip(g[:-1], g[1:]):
            bot, top = ref.pool_pair(bot, top)
            a = bot.reshape(bot.shape[0], bot.shape[1], -1)
            b = top.reshape(top.shape[0], top.shape[1], -1)
            out.append(torch.bmm(b, a.transpose(1, 2)) / a.shape[2])
        return out


class FactorTransfer(nn.Module):
    """RepDistiller's FT: mean|d| (p2 == 1) or mean(d^p2), d = factor(f_s) - factor(f_t),
    factor(f) = normalize(mean_c f^p1) (B, H W), after pooling the larger map to the other's
    (H, H). Not the collection's FT (that compares paraphraser factors).

    p2 == 1 runs fastkd.functional.ft (normalised L1) on the channel means of f^p1; p2 == 2 with
    an even p1 is Attention's loss, fastkd.functional.at(f_s, f_t, p1, normalize=True).
    """

    def __init__(self, p1=2, p2=1):
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s, f_t):
        return self.factor_loss(f_s, f_t)

    def factor_loss(self, f_s, f_t):
        f_s, f_t = _pool(f_s, f_t)
        if self.p2 == 1:
            return F.ft(f_s.pow(self.p1).mean(1), f_t.pow(self.p1).mean(1))
        if self.p2 == 2 and _even(self.p1):
            return F.at(f_s, f_t, self.p1, normalize=True)
        return ref.factor_transfer(f_s, f_t, self.p1, self.p2)

    def factor(self, f):
        return ref.channel_map(f, self.p1)


class ABLoss(nn.Module):
    """AB: forward(g_s, g_t) -> [w_i * sum(AB(s_i, t_i)) / B / 1000 * 3], w_i = 2^(i - feat_num + 1),
    AB the collection's activation-boundary term with margin, on pre-ReLU maps of one shape;
    B = g_s[0]'s batch. fastkd.functional.ab (a mean) times the element count."""

    def __init__(self, feat_num, margin=1.0):
        super().__init__()
        self.w = ref.ab_weights(checks.integer(feat_num, "feat_num", least=1))
        self.margin = checks.argument("margin", margin)

    def forward(self, g_s, g_t):
        pairs = _pairs(g_s, g_t, ndim=None)
        if len(pairs) > len(self.w):
            raise ValueError(f"ABLoss was built for feat_num={len(self.w)} maps, got {len(pairs)}")
        bsz = g_s[0].shape[0]
        return [w * self.criterion_alternative_l2(s, t) / bsz / 1000 * 3
                for w, (s, t) in zip(self.w, pairs)]

    def criterion_alternative_l2(self, source, target):
        return F.ab(source, target, self.margin) * source.numel()


class VIDLoss(nn.Module):
    """VID: mean(0.5 ((mu - t)^2 / var + log var)), mu = regressor(input), var = softplus(log_scale)
    + eps per channel, after pooling the larger map to the other's (H, H).

    Parameters: regressor.{0,2,4}.weight (1x1 convs, torch's default init) and log_scale
    (num_target_channels,), initialised so that var starts at init_pred_var.
    fastkd.functional.vid with RepDistiller's eps 1e-5.
    """

    def __init__(self, num_input_channels, num_mid_channel, num_target_channels,
                 init_pred_var=5.0, eps=VID_EPS):
        super().__init__()

        def conv1x1(c_in, c_out):
            return nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False, stride=1)

        self.regressor = nn.Sequential(
            conv1x1(num_input_channels, num_mid_channel), nn.ReLU(),
            conv1x1(num_mid_channel, num_mid_channel), nn.ReLU(),
            conv1x1(num_mid_channel, num_target_channels))
        self.log_scale = nn.Parameter(np.log(np.exp(init_pred_var - eps) - 1.0)
                                      * torch.ones(num_target_channels))
        self.eps = eps

    def forward(self, input, target):
        input, target = _pool(input, target, "input", "target")
        return F.vid(self.regressor(input), target, self.log_scale, self.eps)


class KDSVD(nn.Module):
    """KDSVD: forward(g_s, g_t) -> len(g_s) - 1 losses (fastkd.reference.repdistiller.kdsvd:
    RBF relations between consecutive layers' leading right singular vectors). Maps (B, C, H, H),
    student and teacher with the same channels per layer."""

    def __init__(self, k=1):
        super().__init__()
        self.k = checks.integer(k, "k", least=1)

    def forward(self, g_s, g_t):
        for i, (s, t) in enumerate(_pairs(g_s, g_t)):
            for x, name in ((s, f"g_s[{i}]"), (t, f"g_t[{i}]")):
                if x.shape[2] != x.shape[3]:
                    raise ValueError(f"{name} must be square (H == W), got shape {tuple(x.shape)}")
            if s.shape[1:] != t.shape[1:]:
                raise ValueError(f"g_s[{i}] and g_t[{i}] must have the same (C, H, W), got "
                                 f"{tuple(s.shape)} and {tuple(t.shape)}")
        return ref.kdsvd(g_s, g_t, self.k)

    def svd(self, feat, n=1):
        return ref.svd(feat, n)

    @staticmethod
    def removenan(x):
        return ref.finite(x)

    @staticmethod
    def align_rsv(a, b):
        return ref.align_rsv(a, b)


# --- CRD ----------------------------------------------------------------------------

class Normalize(nn.Module):
    """x / ||x||_power over dim 1 (power 2: F.normalize)."""

    def __init__(self, power=2):
        super().__init__()
        self.power = power

    def forward(self, x):
        if self.power == 2:
            return TF.normalize(x, p=2, dim=1)
        return x.div(x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power))


class Embed(nn.Module):
    """normalize(linear(flat(x))): (B, ...) -> (B, dim_out). Parameters linear.weight, linear.bias."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        return self.l2norm(self.linear(x.reshape(x.shape[0], -1)))


class AliasMethod:
    """Draws indices from a discrete distribution in O(1) each (Walker's alias method), on the
    device its tables are on (RepDistiller's moves them to CUDA; this one stays where it is
    put and is moved by ContrastMemory to its memory's device)."""

    def __init__(self, probs):
        probs = torch.as_tensor(probs, dtype=torch.float64)
        probs = probs / probs.sum()
        n = len(probs)
        scaled = (probs * n).tolist()
        alias = [0] * n
        small = [i for i, q in enumerate(scaled) if q < 1.0]
        large = [i for i, q in enumerate(scaled) if q >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            alias[s] = g
            scaled[g] = (scaled[g] - 1.0) + scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        for i in small + large:
            scaled[i] = 1.0
        self.prob = torch.tensor(scaled, dtype=torch.float32)
        self.alias = torch.tensor(alias, dtype=torch.long)

    def to(self, device):
        self.prob, self.alias = self.prob.to(device), self.alias.to(device)
        return self

    def cuda(self):
        return self.to("cuda")

    def draw(self, N):
        """N indices (N,) int64: a uniform column k, kept with probability prob[k], else alias[k]."""
        k = torch.zeros(N, dtype=torch.long, device=self.prob.device).random_(0, self.alias.size(0))
        keep = torch.bernoulli(self.prob.index_select(0, k)).long()
        return k * keep + self.alias.index_select(0, k) * (1 - keep)


class ContrastMemory(nn.Module):
    """The two memory banks of CRD (RepDistiller's names): memory_v1 holds the student's past
    embeddings, memory_v2 the teacher's, both (outputSize, inputSize); the float buffer
    params = [K, T, Z_v1, Z_v2, momentum] (Z < 0 until the first call fixes it to
    mean(scores) * outputSize, as stored in params' dtype).

    forward(v1 (B, inputSize) student embedding, v2 teacher embedding, y (B,) dataset indices,
    idx (B, K + 1) or None: then drawn uniformly with idx[:, 0] = y) -> (out_v1, out_v2),
    each (B, K + 1, 1): out_v1 = exp(memory_v2[idx] . v1 / T) / Z_v1, out_v2 = exp(memory_v1[idx]
    . v2 / T) / Z_v2, from the banks as they were; then memory_v*[y] = normalize(momentum
    memory_v*[y] + (1 - momentum) v*) (no grad). The banks are constants of the graph.
    """

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super().__init__()
        self.nLem = checks.integer(outputSize, "outputSize", least=1)
        self.unigrams = torch.ones(self.nLem)
        self.multinomial = AliasMethod(self.unigrams)
        self.K = checks.integer(K, "K", least=1)
        checks.number(T, "T", positive=True)
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1. / math.sqrt(inputSize / 3)
        self.register_buffer("memory_v1", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))

    def _indices(self, v1, v2, y, idx):
        """Checked inputs; the (B, K + 1) sample indices (drawn when idx is None)."""
        checks.tensor(v1, "v1", ndim=2)
        checks.tensor(v2, "v2", ndim=2)
        checks.same_device(v1=v1, v2=v2, y=y, memory=self.memory_v1)
        checks.same_shape(v1, v2, "v1", "v2")
        if v1.shape[1] != self.memory_v1.shape[1]:
            raise ValueError(f"v1, v2 must have inputSize={self.memory_v1.shape[1]} columns, got "
                             f"shape {tuple(v1.shape)}")
        checks.indices(y, "y", (v1.shape[0],), self.memory_v1.shape[0])
        K = int(self.params[0].item())
        if idx is None:
            if self.multinomial.prob.device != self.memory_v1.device:
                self.multinomial.to(self.memory_v1.device)
            idx = self.multinomial.draw(v1.shape[0] * (self.K + 1)).view(v1.shape[0], -1)
            idx.select(1, 0).copy_(y.data)
        checks.indices(idx, "idx", (v1.shape[0], K + 1), self.memory_v1.shape[0])
        return idx

    @torch.no_grad()
    def _normalizers(self, v1, v2, idx):
        """(T, Z_v1, Z_v2) as plain numbers, read from params (RepDistiller's rounding); a Z
        not yet fixed is fixed from this batch."""
        T = self.params[1].item()
        n = self.memory_v1.size(0)
        for slot, name, v, memory in ((2, "Z_v1", v1, self.memory_v2), (3, "Z_v2", v2, self.memory_v1)):
            if self.params[slot].item() < 0:
                self.params[slot] = _crd.contrast_scores(v, memory, idx, T).mean() * n
                print("normalization constant {} is set to {:.1f}".format(name, self.params[slot].item()))
        return T, self.params[2].item(), self.params[3].item()

    @torch.no_grad()
    def _update(self, v1, v2, y):
        momentum = self.params[4].item()
        for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = memory.index_select(0, y.view(-1)).mul_(momentum).add_(v * (1 - momentum))
            memory.index_copy_(0, y, TF.normalize(rows, p=2, dim=1))

    def forward(self, v1, v2, y, idx=None):
        idx = self._indices(v1, v2, y, idx)
        T, z_v1, z_v2 = self._normalizers(v1, v2, idx)
        out_v1 = (_crd.contrast_scores(v1, self.memory_v2, idx, T) / z_v1).unsqueeze(2)
        out_v2 = (_crd.contrast_scores(v2, self.memory_v1, idx, T) / z_v2).unsqueeze(2)
        self._update(v1, v2, y)
        return out_v1, out_v2


class ContrastLoss(nn.Module):
    """CRD's NCE loss, (1,): -(sum_b log(x_b0 / (x_b0 + m/n_data + eps)) + sum_{b,k>=1}
    log((m/n_data) / (x_bk + m/n_data + eps))) / B, x (B, m + 1[, 1]) with the positive first,
    eps = 1e-7 (fastkd.reference.crd.contrast_loss)."""

    def __init__(self, n_data):
        super().__init__()
        self.n_data = n_data

    def forward(self, x):
        return _crd.contrast_loss(x, self.n_data, CRD_EPS).reshape(1)


class CRDLoss(nn.Module):
    """CRD: both contrast losses, student anchors against the teacher bank and teacher anchors
    against the student bank, (1,).

    opt: any object with s_dim, t_dim, feat_dim, nce_k, nce_t, nce_m, n_data (RepDistiller's
    argparse options). forward(f_s (B, ...), f_t (B, ...), idx (B,) dataset indices,
    contrast_idx (B, nce_k + 1) or None: drawn uniformly, the positive idx first). Submodules:
    embed_s, embed_t (Embed), contrast (ContrastMemory), criterion_s, criterion_t.

    Each side runs fastkd.functional.crd_contrast (memory rows gathered and dotted in one pass,
    no (B, nce_k + 1, feat_dim) tensor on CUDA); the banks are updated after the loss.
    """

    def __init__(self, opt):
        super().__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = ContrastLoss(opt.n_data)
        self.criterion_s = ContrastLoss(opt.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        checks.tensor(f_s, "f_s", min_ndim=2)
        checks.tensor(f_t, "f_t", min_ndim=2)
        checks.same_batch(f_s, f_t, "f_s", "f_t")
        v1, v2 = self.embed_s(f_s), self.embed_t(f_t)
        mem = self.contrast
        contrast_idx = mem._indices(v1, v2, idx, contrast_idx)
        T, z_v1, z_v2 = mem._normalizers(v1, v2, contrast_idx)
        s_loss = F.crd_contrast(v1, mem.memory_v2, contrast_idx, T, z_v1, self.criterion_s.n_data, CRD_EPS)
        t_loss = F.crd_contrast(v2, mem.memory_v1, contrast_idx, T, z_v2, self.criterion_t.n_data, CRD_EPS)
        mem._update(v1, v2, idx)
        return (s_loss + t_loss).reshape(1)
