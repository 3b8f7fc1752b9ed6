"""fastkd.reference: every method of the collection in plain PyTorch, its math one line per formula.

The oracle the fast paths are tested against: written for clarity, one line
per formula, never optimised. Class names, constructor and forward arguments,
submodule and buffer names are those of the collection "Knowledge-Distillation-
Zoo" (kd_losses/*.py), so its state_dicts load here with strict=True. Each file
also holds the functional form of its loss, which the dispatcher calls for the
``reference`` backend.
"""
from .ab import AB
from .afd import AFD
from .at import AT
from .bss import BSS, BSSAttacker
from .cc import CC
from .crd import CRD, ContrastLoss, ContrastMemory, Embed
from .dml import DML
from .fitnet import Hint
from .fsp import FSP
from .ft import FT, Paraphraser, Translator
from . import divergences
from .divergences import FusedLinearDistillation
from .fused_linear_soft_target import FusedLinearSoftTarget
from .irg import IRG
from .logits import Logits
from .lwm import LwM
from .nst import NST
from .ofd import OFD
from .pkt import PKTCosSim
from .rkd import RKD
from .sobolev import Sobolev
from .sp import SP
from .st import SoftTarget
from .vid import VID

__all__ = [
    "Logits", "SoftTarget", "AT", "Hint", "NST", "PKTCosSim", "FSP", "FT", "RKD", "AB", "SP",
    "Sobolev", "BSS", "CC", "LwM", "IRG", "VID", "OFD", "AFD", "CRD", "DML",
    "BSSAttacker", "Paraphraser", "Translator", "Embed", "ContrastMemory", "ContrastLoss",
]
