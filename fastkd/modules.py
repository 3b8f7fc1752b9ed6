"""The public losses: drop-ins for the collection's nn.Modules.

Each class subclasses its reference in fastkd.reference, so constructor
arguments, attributes, helper methods, submodules and state_dict keys are the
reference's, and replaces only forward with a call to fastkd.functional, which
checks the inputs and dispatches to the fastest implementation.
"""
import torch

from . import checks
from . import functional as F
from . import reference
from .reference.bss import BSSAttacker
from .reference.crd import contrast_scores
from .reference.ft import Paraphraser, Translator

__all__ = [
    "Logits", "SoftTarget", "AT", "Hint", "NST", "PKTCosSim", "FSP", "FT", "RKD", "AB", "SP",
    "Sobolev", "BSS", "CC", "LwM", "IRG", "VID", "OFD", "AFD", "CRD", "DML",
    "BSSAttacker", "Paraphraser", "Translator",
]


class Logits(reference.Logits):
    """mse(out_s, out_t); out_s, out_t (B, K)."""

    def forward(self, out_s, out_t):
        return F.logits(out_s, out_t)


class SoftTarget(reference.SoftTarget):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2; out_s, out_t (B, K)."""

    def forward(self, out_s, out_t):
        return F.soft_target(out_s, out_t, self.T)


class DML(reference.DML):
    """KLbm(softmax(out2) || softmax(out1)); out1 the peer being trained."""

    def forward(self, out1, out2):
        return F.dml(out1, out2)


class BSS(reference.BSS):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) on attacked samples, no T^2."""

    def forward(self, attacked_out_s, attacked_out_t):
        return F.bss(attacked_out_s, attacked_out_t, self.T)


class AT(reference.AT):
    """mse of the normalised attention maps sum_c |f|^p; fm_* (B, C_*, H, W)."""

    def forward(self, fm_s, fm_t):
        return F.at(fm_s, fm_t, self.p)


class Hint(reference.Hint):
    """mse(fm_s, fm_t), same shapes."""

    def forward(self, fm_s, fm_t):
        return F.hint(fm_s, fm_t)


class NST(reference.NST):
    """Polynomial-kernel (d=2, c=0) MMD of the normalised channel responses; fm_* (B, C_*, H, W)."""

    def forward(self, fm_s, fm_t):
        return F.nst(fm_s, fm_t)


class FSP(reference.FSP):
    """mse of the student and teacher flow matrices G(fm1, fm2) = fm1 fm2^T / HW."""

    def forward(self, fm_s1, fm_s2, fm_t1, fm_t2):
        return F.fsp(fm_s1, fm_s2, fm_t1, fm_t2)


class FT(reference.FT):
    """l1 of the L2-normalised flat factors; factor_* (B, ...)."""

    def forward(self, factor_s, factor_t):
        return F.ft(factor_s, factor_t)


class AB(reference.AB):
    """Activation-boundary margin loss on pre-activation maps of one shape."""

    def forward(self, fm_s, fm_t):
        return F.ab(fm_s, fm_t, self.margin)


class VID(reference.VID):
    """Gaussian NLL of fm_t under N(regressor(fm_s), softplus(alpha) + eps); learns both."""

    def forward(self, fm_s, fm_t):
        checks.channels(fm_s, "fm_s", self.regressor[0].in_channels)
        return F.vid(self.regressor(fm_s), fm_t, self.alpha, self.eps)


class OFD(reference.OFD):
    """Partial L2 between connector(fm_s) and the margin-clipped pre-ReLU fm_t."""

    def forward(self, fm_s, fm_t):
        checks.channels(fm_s, "fm_s", self.connector[0].in_channels)
        return F.ofd(self.connector(fm_s), fm_t)


class AFD(reference.AFD):
    """Channel-attention-weighted squared difference of spatially normalised maps."""

    def forward(self, fm_s, fm_t, eps=1e-6):
        checks.channels(fm_t, "fm_t", self.attention[0].in_channels)
        return F.afd(fm_s, fm_t, self.channel_weights(fm_t), eps)


class Sobolev(reference.Sobolev):
    """mse of the normalised input gradients of the target logits; img requires grad."""

    def forward(self, out_s, out_t, img, target):
        return F.sobolev(out_s, out_t, img, target)


class LwM(reference.LwM):
    """l1 of the normalised Grad-CAM maps of student and teacher."""

    def forward(self, out_s, fm_s, out_t, fm_t, target):
        return F.lwm(out_s, fm_s, out_t, fm_t, target)


class PKTCosSim(reference.PKTCosSim):
    """KL between the cosine-similarity conditional probabilities; feat_* (N, D_*)."""

    def forward(self, feat_s, feat_t, eps=1e-6):
        return F.pkt_cos_sim(feat_s, feat_t, eps)


class RKD(reference.RKD):
    """w_dist * distance term + w_angle * angle term; feat_* (N, D_*), N >= 2."""

    def forward(self, feat_s, feat_t):
        return F.rkd(feat_s, feat_t, self.w_dist, self.w_angle)


class SP(reference.SP):
    """mse of the row-normalised batch similarity matrices; fm_* (N, ...)."""

    def forward(self, fm_s, fm_t):
        return F.sp(fm_s, fm_t)


class CC(reference.CC):
    """mse of the Taylor-expanded RBF correlation matrices; feat_* (N, D_*)."""

    def forward(self, feat_s, feat_t):
        return F.cc(feat_s, feat_t, self.gamma, self.P_order)


class IRG(reference.IRG):
    """Vertex, edge and transformation terms; irg_* = (fm1, fm2, feat, out)."""

    def forward(self, irg_s, irg_t):
        return F.irg(irg_s, irg_t, self.w_irg_vert, self.w_irg_edge, self.w_irg_tran)


@torch.no_grad()
def _normalizer(embed, memory, sample_idx, nce_t, n_data):
    """Z = mean(scores) * n_data as a 0-d tensor on the embeddings' device (the reference's
    .item() would wait for the GPU)."""
    return contrast_scores(embed, memory, sample_idx, nce_t).mean() * n_data


class CRD(reference.CRD):
    """Contrastive loss of both embeddings against the other side's memory bank.

    forward(feat_s (B, ...), feat_t (B, ...), idx (B,), sample_idx (B, nce_n + 1)):
    the loss of this batch, from the memory as it was before the batch; then the
    memory rows idx are updated with the batch's embeddings (no grad).
    """

    def forward(self, feat_s, feat_t, idx, sample_idx):
        checks.tensor(feat_s, "feat_s", min_ndim=2)
        checks.tensor(feat_t, "feat_t", min_ndim=2)
        checks.same_batch(feat_s, feat_t, "feat_s", "feat_t")
        for x, name, dim in ((feat_s, "feat_s", self.embed_s.linear.in_features),
                             (feat_t, "feat_t", self.embed_t.linear.in_features)):
            if x[0].numel() != dim:
                raise ValueError(f"{name} must hold {dim} values per sample, got shape {tuple(x.shape)}")
        mem = self.contrast
        n_data = mem.memory_s.shape[0]
        checks.indices(idx, "idx", (feat_s.shape[0],), n_data)
        checks.indices(sample_idx, "sample_idx", (feat_s.shape[0], mem.N + 1), n_data)
        e_s, e_t = self.embed_s(feat_s), self.embed_t(feat_t)
        if mem.Z_t is None:
            mem.Z_t = _normalizer(e_t, mem.memory_s, sample_idx, mem.T, n_data)
        if mem.Z_s is None:
            mem.Z_s = _normalizer(e_s, mem.memory_t, sample_idx, mem.T, n_data)
        loss = (F.crd_contrast(e_s, mem.memory_t, sample_idx, mem.T, mem.Z_s, n_data, self.criterion_s.eps)
                + F.crd_contrast(e_t, mem.memory_s, sample_idx, mem.T, mem.Z_t, n_data, self.criterion_t.eps))
        mem.update(e_s, e_t, idx)
        return loss
