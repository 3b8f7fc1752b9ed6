"""The losses of fastkd: one table, read by the listing command (python -m fastkd), the
benchmark, the package's exports and the tests.

METHODS: every method of the collection except Baseline (torch's cross_entropy), in the
README's order, by its class name in fastkd and fastkd.reference -> the ops of
fastkd.backend its loss runs through (RKD with both weights runs "rkd", one term alone
"rkd_distance" or "rkd_angle").
"""
METHODS = {
    "Logits": ["logits"], "SoftTarget": ["soft_target"], "AT": ["at"], "Hint": ["hint"],
    "NST": ["nst"], "PKTCosSim": ["pkt_cos_sim"], "FSP": ["fsp"], "FT": ["ft"],
    "RKD": ["rkd", "rkd_distance", "rkd_angle"], "AB": ["ab"], "SP": ["sp"], "Sobolev": ["sobolev"],
    "BSS": ["bss"], "CC": ["cc"], "LwM": ["lwm"],
    "IRG": ["irg_vertex", "irg_edge", "irg_transformation"], "VID": ["vid"], "OFD": ["ofd"],
    "AFD": ["afd"], "CRD": ["crd_contrast"], "DML": ["dml"],
}

LOSSES = tuple(METHODS)

# Losses beyond the collection, by class name -> their ops (their references live in
# fastkd.reference too, but the collection has no module to be a drop-in for).
EXTENSIONS = {"FusedLinearSoftTarget": ["fused_linear_soft_target"]}

# The LM head's other losses, which run through FusedLinearSoftTarget's op and follow its
# backend choice (the listing shows them under it): FusedLinearDistillation's divergences
# and fastkd.functional.generalized_jsd_loss, by the name the benchmark gives them -> that op.
LM_HEAD = {"FusedLinearDistillation": ["fused_linear_soft_target"],
           "generalized_jsd_loss": ["fused_linear_soft_target"]}

# The collection's helper modules that fastkd exports too.
HELPERS = ("BSSAttacker", "Paraphraser", "Translator")
