"""fastkd: knowledge-distillation losses as a drop-in for the collection
"Knowledge-Distillation-Zoo", with one dispatch point choosing the fastest
implementation for the tensors' device.

    import fastkd
    criterion = fastkd.RKD(w_dist=25, w_angle=50)   # was kd_losses.RKD(25, 50)
    loss = criterion(feat_s, feat_t)

fastkd.<Name>       nn.Module losses, same names and arguments as the collection
fastkd.FusedLinearSoftTarget  SoftTarget over an LM head's logits, never materialised
fastkd.FusedLinearDistillation  reverse KL, JSD, skew KL, TVD, ... likewise
fastkd.functional   one function per loss
fastkd.reference    the plain PyTorch oracle
fastkd.use_backend  context manager choosing reference / torch / triton / auto
"""
from . import functional, reference, registry
from .backend import BACKENDS, BackendUnavailableError, current_backend, use_backend
from .modules import (AB, AFD, AT, BSS, CC, CRD, DML, FSP, FT, IRG, NST, OFD, RKD, SP, VID,
                      BSSAttacker, FusedLinearDistillation, FusedLinearSoftTarget, Hint, Logits, LwM, Paraphraser, PKTCosSim,
                      SoftTarget, Sobolev, Translator)

__version__ = "0.1.0"

__all__ = [*registry.LOSSES, *registry.EXTENSIONS, *registry.HELPERS, "FusedLinearDistillation", "functional",
           "reference", "registry", "use_backend", "current_backend", "BACKENDS", "BackendUnavailableError"]
