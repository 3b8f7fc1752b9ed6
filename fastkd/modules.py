"""The public losses: drop-ins for the collection's nn.Modules.

Each class subclasses its reference in fastkd.reference, so constructor
arguments, attributes, helper methods, submodules and state_dict keys are the
reference's (CRD adds its normalisers Z once its first call has fixed them), and
replaces only forward with a call to fastkd.functional, which checks the inputs and
dispatches to the fastest implementation. Constructor arguments are checked when the module
is built, by the rules each call checks them by (fastkd.checks.ARGUMENTS).

The relational losses (PKTCosSim, RKD, SP, CC, IRG) take keyword-only constructor arguments
``global_batch=False, group=None`` besides the collection's, kept as attributes: with
global_batch=True each call is the loss of every rank's batch of a torch.distributed job
(fastkd.functional's module docstring).
"""
import inspect

import torch

from . import checks, distributed, global_crd
from . import functional as F
from . import reference, registry
from .reference.bss import BSSAttacker
from .reference.crd import contrast_scores
from .reference.ft import Paraphraser, Translator

__all__ = [*registry.LOSSES, *registry.EXTENSIONS, *registry.HELPERS]


class _Checked:
    """Base before the reference: the constructor's arguments that fastkd.checks has a rule for
    (T, p, margin, the loss weights, sizes, ...) are checked by it before the reference stores
    them, so that a bad value raises when the module is built, with the message a call gives."""

    def __init__(self, *args, **kwargs):
        init = super().__init__
        try:
            given = inspect.signature(init).bind(*args, **kwargs).arguments
        except TypeError:  # wrong arguments: the reference's own error, from init below
            given = {}
        for name, value in given.items():
            if name in checks.ARGUMENTS:
                checks.argument(name, value)
        init(*args, **kwargs)


class Logits(reference.Logits):
    """mse(out_s, out_t); out_s, out_t (B, K)."""

    def forward(self, out_s, out_t):
        return F.logits(out_s, out_t)


class SoftTarget(_Checked, reference.SoftTarget):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2; out_s, out_t (B, K)."""

    def forward(self, out_s, out_t):
        return F.soft_target(out_s, out_t, self.T)


class DML(reference.DML):
    """KLbm(softmax(out2) || softmax(out1)); out1 the peer being trained."""

    def forward(self, out1, out2):
        return F.dml(out1, out2)


class BSS(_Checked, reference.BSS):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) on attacked samples, no T^2."""

    def forward(self, attacked_out_s, attacked_out_t):
        return F.bss(attacked_out_s, attacked_out_t, self.T)


class AT(_Checked, reference.AT):
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


class AB(_Checked, reference.AB):
    """Activation-boundary margin loss on pre-activation maps of one shape."""

    def forward(self, fm_s, fm_t):
        return F.ab(fm_s, fm_t, self.margin)


class VID(_Checked, reference.VID):
    """Gaussian NLL of fm_t under N(regressor(fm_s), softplus(alpha) + eps); learns both."""

    def forward(self, fm_s, fm_t):
        checks.channels(fm_s, "fm_s", self.regressor[0].in_channels)
        return F.vid(self.regressor(fm_s), fm_t, self.alpha, self.eps)


class OFD(_Checked, reference.OFD):
    """Partial L2 between connector(fm_s) and the margin-clipped pre-ReLU fm_t."""

    def forward(self, fm_s, fm_t):
        checks.channels(fm_s, "fm_s", self.connector[0].in_channels)
        return F.ofd(self.connector(fm_s), fm_t)


class AFD(_Checked, reference.AFD):
    """Channel-attention-weighted squared difference of spatially normalised maps."""

    def __init__(self, in_channels, att_f):
        # The attention's hidden width, as the reference computes it: with none, its conv cannot run.
        checks.size(int(checks.size(in_channels, "in_channels") * att_f), "int(in_channels * att_f)")
        super().__init__(in_channels, att_f)

    def forward(self, fm_s, fm_t, eps=1e-6):
        checks.channels(fm_t, "fm_t", self.attention[0].in_channels)
        return F.afd_attention(fm_s, fm_t, self.pooled_channel_weights, eps)


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

    def __init__(self, *, global_batch=False, group=None):
        super().__init__()
        self.global_batch, self.group = checks.flag(global_batch, "global_batch"), group

    def forward(self, feat_s, feat_t, eps=1e-6):
        return F.pkt_cos_sim(feat_s, feat_t, eps, global_batch=self.global_batch, group=self.group)


class RKD(_Checked, reference.RKD):
    """w_dist * distance term + w_angle * angle term; feat_* (N, D_*), N >= 2."""

    def __init__(self, w_dist, w_angle, *, global_batch=False, group=None):
        super().__init__(w_dist, w_angle)
        self.global_batch, self.group = checks.flag(global_batch, "global_batch"), group

    def forward(self, feat_s, feat_t):
        return F.rkd(feat_s, feat_t, self.w_dist, self.w_angle, global_batch=self.global_batch,
                     group=self.group)


class SP(reference.SP):
    """mse of the row-normalised batch similarity matrices; fm_* (N, ...)."""

    def __init__(self, *, global_batch=False, group=None):
        super().__init__()
        self.global_batch, self.group = checks.flag(global_batch, "global_batch"), group

    def forward(self, fm_s, fm_t):
        return F.sp(fm_s, fm_t, global_batch=self.global_batch, group=self.group)


class CC(_Checked, reference.CC):
    """mse of the Taylor-expanded RBF correlation matrices; feat_* (N, D_*)."""

    def __init__(self, gamma, P_order, *, global_batch=False, group=None):
        super().__init__(gamma, P_order)
        self.global_batch, self.group = checks.flag(global_batch, "global_batch"), group

    def forward(self, feat_s, feat_t):
        return F.cc(feat_s, feat_t, self.gamma, self.P_order, global_batch=self.global_batch,
                    group=self.group)


class IRG(_Checked, reference.IRG):
    """Vertex, edge and transformation terms; irg_* = (fm1, fm2, feat, out)."""

    def __init__(self, w_irg_vert, w_irg_edge, w_irg_tran, *, global_batch=False, group=None):
        super().__init__(w_irg_vert, w_irg_edge, w_irg_tran)
        self.global_batch, self.group = checks.flag(global_batch, "global_batch"), group

    def forward(self, irg_s, irg_t):
        return F.irg(irg_s, irg_t, self.w_irg_vert, self.w_irg_edge, self.w_irg_tran,
                     global_batch=self.global_batch, group=self.group)


@torch.no_grad()
def _normalizer(embed, memory, sample_idx, nce_t, n_data):
    """Z = mean(scores) * n_data as a 0-d tensor on the embeddings' device (the reference's
    .item() would wait for the GPU)."""
    return contrast_scores(embed, memory, sample_idx, nce_t).mean() * n_data


def _all_true(flag):
    """bool(flag): on a GPU a host sync, made by CRD's first call only (which fixes Z, and must
    raise before anything is written). fastkd.kernels.resources, which fails on host syncs,
    stands in for this one."""
    return bool(flag)


def _exporting():
    """Whether torch.export is tracing. The flag that torch.export sets is read itself:
    TorchDynamo before torch 2.13 traced torch.compiler.is_exporting() as True under
    torch.compile too, which refused CRD's first compiled call (seen with torch 2.11)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


class CRD(_Checked, reference.CRD):
    """Contrastive loss of both embeddings against the other side's memory bank.

    forward(feat_s (B, ...), feat_t (B, ...), idx (B,), sample_idx (B, nce_n + 1)):
    the loss of this batch, from the memory as it was before the batch; then the
    memory rows idx are updated with the batch's embeddings (no grad).

    State: the memory banks and the normalisers contrast.Z_s, contrast.Z_t (buffers,
    None until the first call fixes them from its batch). state_dict holds Z once set,
    so a resumed run computes the same loss; a state_dict without Z (the collection's,
    or one saved before the first call) loads with strict=True and leaves Z to the next
    call, as in the collection. A call that raises (a bad input, or NaN/Inf in the
    features, the embeddings or what would be written) leaves all of it unchanged. On a
    GPU, once the first call has fixed Z, a call never waits on the device (so that CUDA
    graphs and torch.compile's reduce-overhead mode can hold it): NaN/Inf there is not
    raised but leaves the rows it would have written unchanged, and the loss not finite.

    Across processes (keyword-only; fastkd.global_crd has the math):
    global_batch=True: in a job of W ranks (torch.distributed initialised; group, a
      process group, defaults to the world), every rank's call is one call on the
      concatenation of all ranks' batches in rank order (local batch sizes may differ):
      the same loss on every rank, each rank's gradient W times the single process's for
      its rows (DistributedDataParallel's mean over ranks makes it the single process's),
      and the banks and Z the single process's, identical on every rank. Every rank must
      call it at every step. A bad input on any rank raises on every rank and changes
      nothing anywhere.
    bank_sharding=True (with global_batch=True): rank r holds only rows
      [r C, min((r + 1) C, n_data)), C = ceil(n_data / W), of each bank (their union is
      the single process's banks); state_dict then holds this rank's shard, and loads
      only into a module built for the same rank and W; full_state_dict() gathers the
      whole banks (a collective), which load anywhere: into a sharded module (it keeps
      its rows) of any W, or an unsharded one. The banks are built whole at
      construction (as the collection's, so that a seed gives the same banks) and then
      cut. Wrap the module in DistributedDataParallel with broadcast_buffers=False: its
      shards differ from rank to rank.
    """

    def __init__(self, s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data, *,
                 global_batch=False, group=None, bank_sharding=False):
        checks.flag(global_batch, "global_batch")
        checks.flag(bank_sharding, "bank_sharding")
        if bank_sharding and not global_batch:
            raise ValueError("bank_sharding=True needs global_batch=True: the banks are shared by "
                             "the ranks' global batch")
        if group is not None and not global_batch:
            raise ValueError("group is used only with global_batch=True")
        if global_batch:
            rank, _ = distributed.rank_and_size(group)  # raises unless initialised
            if rank < 0:
                raise ValueError("group must be a process group this process belongs to")
        super().__init__(s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data)
        # Plain attributes in the collection; as buffers they move with .to() and are saved
        # (a None buffer is left out of state_dict, so a fresh module's keys stay the collection's).
        mem = self.contrast
        del mem.Z_s, mem.Z_t
        mem.register_buffer("Z_s", None)
        mem.register_buffer("Z_t", None)
        self.global_batch, self.group, self.bank_sharding = global_batch, group, bank_sharding
        if bank_sharding:
            start, stop = self._held_rows()
            mem.memory_s = mem.memory_s[start:stop].clone()
            mem.memory_t = mem.memory_t[start:stop].clone()

    def _held_rows(self):
        """[start, stop): the rows of the n_data bank rows this module holds."""
        n_data = self.criterion_s.n_data
        if not self.bank_sharding:
            return 0, n_data
        return global_crd.shard_range(n_data, *distributed.rank_and_size(self.group))

    def full_state_dict(self):
        """state_dict() with whole banks (n_data rows each), which loads into a CRD of any
        world size, sharded or not. With bank_sharding=True every rank's shard is gathered:
        a collective, which every rank of the group calls (each gets the whole dict);
        otherwise it is state_dict() itself."""
        state = self.state_dict()
        if self.bank_sharding:
            _, world = distributed.rank_and_size(self.group)
            n_data = self.criterion_s.n_data
            sizes = [stop - start for start, stop in (global_crd.shard_range(n_data, r, world)
                                                      for r in range(world))]
            for bank in ("memory_s", "memory_t"):
                state[f"contrast.{bank}"] = distributed.gather_rows(state[f"contrast.{bank}"], sizes, self.group)
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Banks: whole ones (full_state_dict, or a single process's) load into a shard as
        # its rows; a shard loads only where it was saved (same rank and world size).
        # state_dict is load_state_dict's own copy of the caller's: replacing an entry
        # changes nothing of the caller's.
        (start, stop), n_data = self._held_rows(), self.criterion_s.n_data
        for bank in ("memory_s", "memory_t"):
            key = f"{prefix}contrast.{bank}"
            rows = state_dict[key].shape[0] if isinstance(state_dict.get(key), torch.Tensor) else None
            if rows is None or rows == stop - start:
                continue
            if rows == n_data:
                state_dict[key] = state_dict[key][start:stop]
            else:
                error_msgs.append(
                    f"{key} has {rows} rows, neither the whole bank ({n_data}) nor the {stop - start} rows "
                    f"[{start}, {stop}) this module holds: a state_dict of sharded banks loads only into "
                    f"the rank and world size that saved it; save it with full_state_dict() to load it "
                    f"elsewhere")
        # Z_s was computed against memory_t and Z_t against memory_s. A state_dict that
        # brings a bank without its Z unsets that Z; one with Z gets a slot to load into.
        mem = self.contrast
        for z, bank in (("Z_s", "memory_t"), ("Z_t", "memory_s")):
            if f"{prefix}contrast.{z}" in state_dict:
                if getattr(mem, z) is None:
                    setattr(mem, z, getattr(mem, bank).new_empty(()))
            elif f"{prefix}contrast.{bank}" in state_dict:
                setattr(mem, z, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, feat_s, feat_t, idx, sample_idx):
        if self.global_batch:
            return global_crd.forward(self, feat_s, feat_t, idx, sample_idx)
        mem = self.contrast
        n_data = mem.memory_s.shape[0]
        idx, sample_idx = self._checked(feat_s, feat_t, idx, sample_idx, n_data)
        e_s, e_t = self.embed_s(feat_s), self.embed_t(feat_t)

        # All this call would write, computed first and committed only once it is known to
        # be finite: a failing call leaves the banks and Z exactly as they were.
        rows_s = self._momentum_rows(mem.memory_s, e_s, idx, mem.momentum)
        rows_t = self._momentum_rows(mem.memory_t, e_t, idx, mem.momentum)
        ok = torch.cat([rows_s, rows_t]).isfinite().all()
        z_s, z_t = mem.Z_s, mem.Z_t
        if z_s is None:  # fixed by the first call
            z_s = _normalizer(e_s, mem.memory_t, sample_idx, mem.T, n_data)
            ok &= z_s.isfinite() & (z_s > 0)
        if z_t is None:
            z_t = _normalizer(e_t, mem.memory_s, sample_idx, mem.T, n_data)
            ok &= z_t.isfinite() & (z_t > 0)
        if torch.compiler.is_compiling():  # a compiled graph cannot branch on it: asserts instead
            torch._assert_async(ok, "CRD: NaN or Inf in feat_s, feat_t, their embeddings or the memory "
                                    "update; CRD's memory banks and Z were left unchanged")
        elif checks.host_tensor(feat_s) or mem.Z_s is None or mem.Z_t is None:
            if not _all_true(ok):
                self._raise_non_finite(feat_s, feat_t, e_s, e_t, idx, z_s, z_t)
        else:
            # On a GPU once Z is fixed: no host sync, so that the call can run inside a CUDA
            # graph. A non-finite update is not written (the rows keep their values); its
            # cause shows in the loss, which is then not finite.
            rows_s = torch.where(ok, rows_s, mem.memory_s[idx])
            rows_t = torch.where(ok, rows_t, mem.memory_t[idx])

        loss = (F.crd_contrast(e_s, mem.memory_t, sample_idx, mem.T, z_s, n_data, self.criterion_s.eps)
                + F.crd_contrast(e_t, mem.memory_s, sample_idx, mem.T, z_t, n_data, self.criterion_t.eps))
        # The loss has read the banks as they were before this batch; now commit.
        self._commit_state(z_s, z_t, idx, rows_s, rows_t)
        return loss

    # The memory update's two steps, methods so that fastkd.global_crd reaches them through
    # the module it is given.
    @staticmethod
    @torch.no_grad()
    def _momentum_rows(memory, embed, idx, momentum):
        """The reference's update, not yet written: normalize(mom * memory[idx] + (1 - mom) * embed)."""
        rows = memory[idx] * momentum + embed.detach() * (1 - momentum)
        # In the bank's dtype, so that writing it cannot fail after another part is written.
        return torch.nn.functional.normalize(rows, p=2, dim=1).to(memory.dtype)

    def _commit_state(self, z_s, z_t, idx, rows_s, rows_t):
        """CRD's one state change, after every check: Z where not yet fixed, then the bank rows."""
        mem = self.contrast
        if mem.Z_s is None:
            mem.Z_s = z_s
        if mem.Z_t is None:
            mem.Z_t = z_t
        mem.memory_s.index_copy_(0, idx, rows_s)
        mem.memory_t.index_copy_(0, idx, rows_t)

    def _checked(self, feat_s, feat_t, idx, sample_idx, n_data):
        """The inputs checked (raising before anything is computed), and idx, sample_idx as
        the call uses them."""
        mem = self.contrast
        checks.tensor(feat_s, "feat_s", min_ndim=2)
        checks.tensor(feat_t, "feat_t", min_ndim=2)
        checks.same_batch(feat_s, feat_t, "feat_s", "feat_t")
        for x, name, dim in ((feat_s, "feat_s", self.embed_s.linear.in_features),
                             (feat_t, "feat_t", self.embed_t.linear.in_features)):
            if x[0].numel() != dim:
                raise ValueError(f"{name} must hold {dim} values per sample, got shape {tuple(x.shape)}")
        checks.indices(idx, "idx", (feat_s.shape[0],), n_data)
        checks.indices(sample_idx, "sample_idx", (feat_s.shape[0], mem.N + 1), n_data)
        checks.same_device(feat_s=feat_s, feat_t=feat_t, idx=idx, sample_idx=sample_idx,
                           memory=mem.memory_s)
        checks.argument("nce_t", mem.T)
        if _exporting() and (mem.Z_s is None or mem.Z_t is None):
            raise RuntimeError("CRD fixes its normalisers Z_s, Z_t from the data of its first call, "
                               "which torch.export cannot express: call it once (or load a state_dict "
                               "that has them) before exporting")
        idx = idx.long()  # index_copy_ takes int64 only
        if sample_idx.dtype not in (torch.int32, torch.int64):
            sample_idx = sample_idx.long()  # indexing would read uint8 as a mask
        return idx, sample_idx

    @torch.no_grad()
    def _raise_non_finite(self, feat_s, feat_t, e_s, e_t, idx, z_s, z_t, banks=True):
        """Names the cause of a non-finite update (only a failing call looks); banks=False
        leaves out the bank rows at idx (a sharded bank does not hold them)."""
        mem = self.contrast
        unchanged = "CRD's memory banks and Z were left unchanged"
        weights = " (its weights are not finite, or it overflows)"
        suspects = [(feat_s, "feat_s", ""), (feat_t, "feat_t", ""),
                    (e_s, "embed_s(feat_s)", weights), (e_t, "embed_t(feat_t)", weights)]
        if banks:
            suspects += [(mem.memory_s[idx], "memory_s at rows idx", ""),
                         (mem.memory_t[idx], "memory_t at rows idx", "")]
        for x, what, hint in suspects:
            if not x.isfinite().all():
                raise ValueError(f"{what} has NaN or Inf values{hint}; {unchanged}")
        for name, z, bank in (("Z_s", z_s, "memory_t"), ("Z_t", z_t, "memory_s")):
            if not (z.isfinite() & (z > 0)):
                raise ValueError(f"{name} = mean(exp({bank}[sample_idx] . embed / nce_t)) * n_data "
                                 f"is {z.item()}, not a positive finite number (nce_t={mem.T}); {unchanged}")
        raise ValueError(f"CRD's memory update is not finite (nce_mom={mem.momentum}); {unchanged}")


class FusedLinearSoftTarget(_Checked, reference.FusedLinearSoftTarget):
    """SoftTarget on LM-head logits that are never materialised (fastkd.functional.
    fused_linear_soft_target has the math): T^2 KL(p_t^T || p_s^T) over the kept tokens,
    plus hard_weight x cross-entropy, from hidden states (..., H) and the head's weight (V, H).

        loss_fn = fastkd.FusedLinearSoftTarget(T=2.0, hard_weight=0.5)
        loss = loss_fn(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
    """

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                *, student_bias=None, teacher_bias=None, teacher_logits=None, teacher_topk_indices=None,
                teacher_topk_logprobs=None):
        return F.fused_linear_soft_target(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
            teacher_topk_indices=teacher_topk_indices, teacher_topk_logprobs=teacher_topk_logprobs,
            T=self.T, reduction=self.reduction, ignore_index=self.ignore_index,
            hard_weight=self.hard_weight, chunk_size=self.chunk_size)


class FusedLinearDistillation(_Checked, reference.divergences.FusedLinearDistillation):
    """A divergence of LLM distillation on LM-head logits that are never materialised
    (fastkd.functional.fused_linear_distillation has the math): divergence one of "kl",
    "reverse_kl", "jsd" (beta), "skew_kl", "skew_reverse_kl" (alpha), "tvd", times T^2, over
    the kept tokens, plus hard_weight x cross-entropy; the forward takes
    FusedLinearSoftTarget's arguments. topk_rest: "renormalise" or "bucket", a top-k
    teacher's mass outside its k classes. FusedLinearDistillation("kl", T=T) is
    FusedLinearSoftTarget(T).

        loss_fn = fastkd.FusedLinearDistillation("jsd", T=2.0, beta=0.5)
        loss = loss_fn(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
    """

    def __init__(self, divergence, *, T=1.0, beta=0.5, alpha=0.1, topk_rest="renormalise", reduction="batchmean",
                 ignore_index=-100, hard_weight=0.0, chunk_size=None):
        F._divergence(divergence, beta, alpha, topk_rest, False)
        super().__init__(divergence, T=T, beta=beta, alpha=alpha, topk_rest=topk_rest, reduction=reduction,
                         ignore_index=ignore_index, hard_weight=hard_weight, chunk_size=chunk_size)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                *, student_bias=None, teacher_bias=None, teacher_logits=None, teacher_topk_indices=None,
                teacher_topk_logprobs=None):
        return F.fused_linear_distillation(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
            teacher_topk_indices=teacher_topk_indices, teacher_topk_logprobs=teacher_topk_logprobs,
            divergence=self.divergence, T=self.T, beta=self.beta, alpha=self.alpha, topk_rest=self.topk_rest,
            reduction=self.reduction, ignore_index=self.ignore_index, hard_weight=self.hard_weight,
            chunk_size=self.chunk_size)


__all__ += ["FusedLinearDistillation"]
