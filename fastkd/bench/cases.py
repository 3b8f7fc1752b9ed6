"""The benchmark cases: every loss of fastkd at a sweep of realistic shapes.

One copy, shared by ``python -m fastkd.bench`` and the pytest-benchmark suite
in benchmarks/. A case says which module to build (the same class name in
fastkd and in fastkd.reference, with the same constructor arguments and, for
modules with parameters, the same state_dict) and how to make fresh inputs.
What is timed is ``module(*inputs).backward()``: forward and backward.

Sweeps (``cases(sweep, device_type)``):
  tiny   a few small shapes for the tests of the bench code itself.
  collection  each call the collection's training scripts make (train_kd.py and its
         siblings on CIFAR-100: batch 128, 100 classes, resnet20/110 maps (128, 16, 32, 32),
         (128, 32, 16, 16), (128, 64, 8, 8), features (128, 64); CRD at nce_n=16384,
         feat_dim=128; BSS on the 32 attacked samples): what its users run. Named by the
         tensors the script passes (rb1..rb3 the residual blocks, feat, out).
  quick  one case per loss, the first call the collection's scripts make of it (CRD at
         nce_n=4096 for a batch of 32, Sobolev and LwM at batch 32): a first look, under two
         minutes on 2 CPU cores (the README's main command).
  full   the collection's calls, then the realistic sweep: pairwise losses at batch 64..16384 of 512-d features
         (64..2048 on CPU), feature-map losses at CIFAR (B=128, C=16..64, 32x32..8x8)
         and ImageNet (B=256, or 32 on CPU, C=64..2048, 56x56..7x7) layer shapes,
         logit losses over vocabularies 10..128k with 8192 rows (1024 on CPU),
         CRD at nce_n=16384, feat_dim=128.
  FusedLinearSoftTarget (beyond the collection; --losses FusedLinearSoftTarget): an LM
  head's distillation, tokens x hidden x vocabulary, in bfloat16 on CUDA at 1024 and 8192
  tokens, H=4096, V=32k and 128k (float32 with smaller shapes on CPU).
  FusedLinearDistillation (--losses FusedLinearDistillation): the same problems under each
  divergence; generalized_jsd_loss (--losses generalized_jsd_loss): TRL's GKD loss on both
  models' logits (2, BT / 2, V) of as many tokens. Each is timed only when named: six
  divergences, each compiled by the compile variant, would take minutes of a CPU run.

The student's inputs require grad and the teacher's do not, as in training.
Sobolev and LwM need the gradients of a network's outputs, so their cases run
a tiny conv net forward when making inputs; the loss's double backward through
that net is part of what is timed, alike for every variant.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import fastkd
from fastkd import reference, registry
from fastkd.reference import divergences
from fastkd.common import nst_spatial_form

SWEEPS = ("tiny", "collection", "quick", "full")

# Method name -> accepted spellings of --losses (case-insensitive).
ALIASES = {"PKT": "PKTCosSim", "FitNet": "Hint", "FitNets": "Hint", "ST": "SoftTarget", "KD": "SoftTarget"}

# Every method of the collection except Baseline, in the README's order (fastkd.registry),
# then the losses beyond it.
LOSSES = registry.LOSSES + tuple(registry.EXTENSIONS) + tuple(registry.LM_HEAD)


@dataclass
class Case:
    """One loss at one shape.

    loss      method name (class name in fastkd and fastkd.reference), or a function's name
              in FUNCTIONS.
    shape     short label of the shape, e.g. "N=512 D=512".
    x, x_name the value of the sweep variable (batch, vocabulary, ...) and its name.
    size      a measure that grows with the memory the reference needs; with
              monotone=True a variant that ran out of memory or time at one size is
              not tried at larger sizes of the same loss.
    args, kwargs  the module's constructor arguments.
    inputs    inputs(device, dtype, generator) -> fresh tuple of forward arguments.
    flops     matrix-product flops fastkd's algorithm cannot avoid (forward + backward): Gram
              products and the like, which a kernel can run on tensor cores (for float32 at the
              rate of a float32-accurate split such as tf32x3: fastkd.bench.roofline, the floor).
    conv_flops  flops of torch's own convolutions in the loss (VID's regressor, OFD's connector),
              at the rate cuDNN runs them (TF32 for float32 unless torch is told otherwise).
    vector_ops  float32 vector instructions (an add, a multiply or an FMA each) of elementwise
              work that no matrix unit can take: RKD's O(N^3) angle term, CRD's gathered dots.
    extra_values  values of the case's dtype moved beyond reading the inputs and parameters and
              writing their gradients (CRD's memory-bank rows and their update).
    floor     False where no floor is meaningful (the time is the network's, not the loss's).
    dtype     the case's own dtype, overriding the run's (None: the run's --dtype).
    numel     element count of the first input of each of the loss's ops (fastkd.registry),
              what the auto backend's choice on CUDA depends on (fastkd.backend.CUDA_TORCH_BELOW).
    """
    loss: str
    shape: str
    x: int
    x_name: str
    size: int
    args: tuple
    inputs: Callable
    kwargs: dict = field(default_factory=dict)
    monotone: bool = True
    flops: int = 0
    conv_flops: int = 0
    vector_ops: int = 0
    extra_values: int = 0
    floor: bool = True
    params: dict = field(default_factory=dict)
    dtype: torch.dtype = None
    numel: dict = field(default_factory=dict)

    @property
    def name(self):
        return f"{self.loss} {self.shape}"

    def build(self, impl, device, dtype):
        """The module of impl ("reference" or "fastkd"), same state_dict for both."""
        torch.manual_seed(0)
        if self.loss in FUNCTIONS:
            return FUNCTIONS[self.loss](*self.args, reference=impl == "reference", **self.kwargs).to(device, dtype)
        ref = getattr(reference, self.loss)(*self.args, **self.kwargs)
        module = ref if impl == "reference" else getattr(fastkd, self.loss)(*self.args, **self.kwargs)
        if module is not ref:
            module.load_state_dict(ref.state_dict())
        return module.to(device=device, dtype=dtype)


def _randn(shape, device, dtype, gen, grad=False):
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    return x.requires_grad_(grad)


def _pair(shape_s, shape_t=None):
    """Inputs (student requiring grad, teacher) of the given shapes."""
    shape_t = shape_t or shape_s

    def make(device, dtype, gen):
        return (_randn(shape_s, device, dtype, gen, grad=True), _randn(shape_t, device, dtype, gen))
    return make


# --- shapes of each sweep ----------------------------------------------------------

# Pairwise losses: batch sizes of D-dimensional features.
_PAIRWISE = {"tiny": ([8, 16], 32),
             "full": {"cpu": ([64, 128, 256, 512, 1024, 2048], 512),
                      "cuda": ([64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], 512)}}

# Feature maps: (B, C, H, W) layers of CIFAR ResNets and an ImageNet ResNet-50.
_CIFAR = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]


def _imagenet(batch):
    return [(batch, 64, 56, 56), (batch, 256, 56, 56), (batch, 512, 28, 28), (batch, 1024, 14, 14),
            (batch, 2048, 7, 7)]


# Each entry lists networks, each a list of its layers in order (FSP pairs consecutive layers).
_MAPS = {"tiny": [[(4, 8, 8, 8), (4, 16, 4, 4)]],
         "full": {"cpu": [_CIFAR, _imagenet(32)], "cuda": [_CIFAR, _imagenet(256)]}}

# Logit losses: (rows, vocabulary).
_VOCABS = [10, 100, 1000, 32000, 128000]
_LOGITS = {"tiny": [(8, 10), (8, 100)],
           "full": {"cpu": [(1024, k) for k in _VOCABS], "cuda": [(8192, k) for k in _VOCABS]}}

# CRD: batch sizes, with (nce_n, feat_dim, n_data, s_dim, t_dim).
_CRD = {"tiny": ([4, 8], (64, 16, 500, 32, 32)), "quick": ([32], (4096, 128, 50000, 256, 256)),
        "full": {"cpu": ([16, 32, 64, 128], (16384, 128, 50000, 256, 256)),
                 "cuda": ([64, 128, 256, 512, 1024], (16384, 128, 50000, 256, 256))}}

# FusedLinearSoftTarget: (tokens, hidden, vocabulary), and the dtype where it is fixed.
_LM_HEAD = {"tiny": [(16, 32, 100)], "collection": [(256, 256, 8000)], "quick": [(256, 256, 8000)],
            "full": {"cpu": [(1024, 1024, 32000)],
                     "cuda": [(bt, 4096, v) for bt in (1024, 8192) for v in (32000, 128000)]}}

# Sobolev and LwM: batch sizes of (3, S, S) images through a tiny conv net of width C.
_NET = {"tiny": ([4, 8], 8, 8), "quick": ([32], 32, 16),
        "full": {"cpu": ([32, 64, 128, 256], 32, 16), "cuda": ([64, 128, 256, 512, 1024], 32, 32)}}


def _pick(table, sweep, device_type):
    value = table[sweep]
    return value["cuda" if device_type == "cuda" else "cpu"] if isinstance(value, dict) else value


# --- the floor's work --------------------------------------------------------------

def work(loss, args, *shapes):
    """The work a loss cannot avoid, beyond reading its inputs and parameters once and writing
    their gradients once (which fastkd.bench.measure.floor_bytes counts from the tensors):
    {flops, conv_flops, vector_ops, extra_values} as Case holds them (forward + backward, the
    teacher's inputs needing no gradient). shapes: the student's input shapes, in the order
    the loss takes them; args: the module's constructor arguments."""
    first = shapes[0]
    n, per_row = first[0], math.prod(first[1:])
    gram = 2 * n * n * per_row  # X X^T over a batch of flattened rows

    def spatial(shape):
        return shape[2] * shape[3] if len(shape) == 4 else 1
    if loss in ("SP", "PKTCosSim", "CC"):
        # The Gram (or cosine) matrices of s and t, and dG X for the student's gradient.
        return {"flops": 3 * gram}
    if loss == "RKD":
        return {"flops": 3 * gram, "vector_ops": rkd_angle_ops(n) if args[1] else 0}
    if loss == "IRG":  # Gram matrices of the first three inputs (maps and features); the logits' term is mse
        return {"flops": sum(3 * 2 * n * n * math.prod(s[1:]) for s in shapes[:3])}
    if loss == "NST":
        # K_ss, K_tt, K_st forward and one product each for the student's gradient from K_ss
        # and K_st (the teacher needs none), in the form fastkd takes (HW x HW or C x C).
        b, c, hw = n, first[1], spatial(first)
        return {"flops": 5 * 2 * b * c * hw * (hw if nst_spatial_form(c, c, hw) else c)}
    if loss == "FSP":
        # G = F1 F2^T / HW of s and t (F1 pooled to F2's size), then dF1 = dG F2 and
        # dF2 = dG^T F1 for the student.
        c1, (b, c2) = first[1], shapes[1][:2]
        return {"flops": 4 * 2 * b * c1 * c2 * spatial(shapes[1])}
    if loss == "VID":
        # The regressor's three 1x1 convs: forward, and the input's and the weight's gradient
        # of each (the student's map needs its gradient, so the first conv's input does too).
        c_in, mid, c_out = args[:3]
        return {"conv_flops": 3 * 2 * n * spatial(first) * (c_in * mid + mid * mid + mid * c_out)}
    if loss == "OFD":  # the connector's 1x1 conv, forward and its two gradients
        return {"conv_flops": 3 * 2 * n * spatial(first) * args[0] * args[1]}
    if loss == "CRD":
        _, _, feat_dim, nce_n, _, _, n_data = args
        return crd_work(n, nce_n, feat_dim, n_data)
    if loss in ("FusedLinearSoftTarget", "FusedLinearDistillation"):
        # Student and teacher logits, then the student's hidden and weight gradients.
        (bt, h), (v, _) = shapes[:2]
        return {"flops": 4 * 2 * bt * v * h}
    # The elementwise, attention-map and logit losses: memory traffic only.
    return {}


# --- families -------------------------------------------------------------------

def _pairwise_cases(sweep, device_type):
    batches, d = _pick(_PAIRWISE, sweep, device_type)
    out = []
    for n in batches:
        shape = f"N={n} D={d}"
        params = {"N": n, "D": d}
        out += [Case(loss, shape, n, "batch", n, args, _pair((n, d)), params=params, **work(loss, args, (n, d)))
                for loss, args in (("RKD", (25.0, 50.0)), ("SP", ()), ("PKTCosSim", ()), ("CC", (0.4, 2)))]
        out.append(_irg_case(n, d, sweep))
    return out


def rkd_angle_ops(n):
    """Vector instructions RKD's angle term cannot avoid: per anchor i and unordered pair
    {j, k} (N^3 / 2 of them; the angle is symmetric in j, k), each side's cosine from the
    squared distances (two adds, two multiplies), the difference, smooth L1 and its
    derivative (four), and two gradient sums per side (four): 16, in one fused pass that
    writes the gradients as it goes (no recomputation in backward)."""
    return 16 * n ** 3 // 2


def _irg_case(n, d, sweep):
    """IRG on CIFAR-like layers: fm1 (N, c, 2s, 2s) before fm2 (N, 2c, s, s), feat (N, D), out (N, 100)."""
    c, s = (4, 4) if sweep == "tiny" else (32, 8)
    shapes = [(n, c, 2 * s, 2 * s), (n, 2 * c, s, s), (n, d), (n, 100)]

    def make(device, dtype, gen):
        s_side = [_randn(sh, device, dtype, gen, grad=True) for sh in shapes]
        t_side = [_randn(sh, device, dtype, gen) for sh in shapes]
        return s_side, t_side
    return Case("IRG", f"N={n} D={d}", n, "batch", n, (0.1, 5.0, 5.0), make,
                params={"N": n, "D": d, "fm1": list(shapes[0][1:]), "fm2": list(shapes[1][1:])},
                numel={"irg_vertex": n * 100}, **work("IRG", (0.1, 5.0, 5.0), *shapes))


def _map_label(shape):
    b, c, h, w = shape
    return f"B={b} C={c} {h}x{w}"


def _map_cases(sweep, device_type):
    networks = _pick(_MAPS, sweep, device_type)
    out = []
    for shape in (layer for layers in networks for layer in layers):
        b, c, h, w = shape
        label, elems = _map_label(shape), b * c * h * w
        params = {"B": b, "C": c, "H": h, "W": w}

        def case(loss, args=()):
            return Case(loss, label, c * h * w, "values per sample", elems, args, _pair(shape),
                        monotone=False, params=params, numel={op: elems for op in registry.METHODS[loss]},
                        **work(loss, args, shape))
        out += [case("AT", (2.0,)), case("Hint"), case("NST"), case("FT"), case("AB", (1.0,)),
                case("VID", (c, c, c, 5.0)), case("OFD", (c, c)), case("AFD", (c, 1.0))]
    # FSP: consecutive layers (the first pooled to the second's size when larger).
    for first, second in ((a, b) for layers in networks for a, b in zip(layers, layers[1:])):
        b, c1, h1, w1 = first
        _, c2, h2, w2 = second

        def make(device, dtype, gen, first=first, second=second):
            return (_randn(first, device, dtype, gen, grad=True), _randn(second, device, dtype, gen, grad=True),
                    _randn(first, device, dtype, gen), _randn(second, device, dtype, gen))
        out.append(Case("FSP", f"B={b} {c1}x{h1}x{w1}>{c2}x{h2}x{w2}", c1 * h1 * w1 + c2 * h2 * w2,
                        "values per sample", b * (c1 * h1 * w1 + c2 * h2 * w2), (), make, monotone=False,
                        params={"B": b, "fm1": [c1, h1, w1], "fm2": [c2, h2, w2]},
                        numel={"fsp": b * c1 * h1 * w1}, **work("FSP", (), first, second)))
    return out


def _logit_cases(sweep, device_type):
    out = []
    for rows, k in _pick(_LOGITS, sweep, device_type):
        label, params = f"{rows}x{k}", {"rows": rows, "classes": k}
        for loss, args in (("Logits", ()), ("SoftTarget", (4.0,)), ("BSS", (4.0,)), ("DML", ())):
            out.append(Case(loss, label, k, "classes", rows * k, args, _pair((rows, k)), params=params,
                            numel={op: rows * k for op in registry.METHODS[loss]}))
    return out


def crd_work(b, nce_n, feat_dim, n_data):
    """CRD's floor beyond its inputs and parameters, both sides alike: each of the B (nce_n + 1)
    gathered rows dotted with its sample's embedding, and the embedding's gradient summed back
    over them: two FMAs per gathered value, vector work (a batched matrix-vector product, no
    tensor-core work). Its bytes: the distinct memory rows gathered, once (random rows repeat:
    their expected number, n_data (1 - exp(-draws / n_data)); a kernel that groups a row's
    gathers reads it once, and the banks fit in a large L2), and the B updated rows written."""
    draws = b * (nce_n + 1)
    distinct = round(n_data * -math.expm1(-draws / n_data))
    return {"vector_ops": 2 * 2 * draws * feat_dim, "extra_values": 2 * (distinct + b) * feat_dim}


def _crd_cases(sweep, device_type):
    batches, (nce_n, feat_dim, n_data, s_dim, t_dim) = _pick(_CRD, sweep, device_type)
    out = []
    for b in batches:
        def make(device, dtype, gen, b=b):
            idx = torch.randint(0, n_data, (b,), device=device, generator=gen)
            sample_idx = torch.randint(0, n_data, (b, nce_n + 1), device=device, generator=gen)
            sample_idx[:, 0] = idx
            return (_randn((b, s_dim), device, dtype, gen, grad=True), _randn((b, t_dim), device, dtype, gen),
                    idx, sample_idx)
        out.append(Case("CRD", f"B={b} n={nce_n} d={feat_dim}", b, "batch", b,
                        (s_dim, t_dim, feat_dim, nce_n, 0.1, 0.5, n_data), make,
                        **work("CRD", (s_dim, t_dim, feat_dim, nce_n, 0.1, 0.5, n_data), (b, s_dim)),
                        params={"B": b, "nce_n": nce_n, "feat_dim": feat_dim, "n_data": n_data,
                                "s_dim": s_dim, "t_dim": t_dim}))
    return out


# FusedLinearDistillation's settings: T as FusedLinearSoftTarget's case, beta TRL's default,
# alpha DistiLLM's. generalized_jsd_loss's: TRL's GKDConfig defaults.
_DIVERGENCE_OPTIONS = {"T": 2.0, "beta": 0.5, "alpha": 0.1}
_GKD_OPTIONS = {"beta": 0.5, "temperature": 0.9}


class GeneralizedJSD(nn.Module):
    """fastkd.functional.generalized_jsd_loss(student_logits, teacher_logits, labels, beta,
    temperature) as a module, or with reference=True the materialised one written from TRL's
    GKDTrainer.generalized_jsd_loss (fastkd.reference.divergences): TRL's own computation."""

    def __init__(self, beta=0.5, temperature=1.0, *, reference=False):
        super().__init__()
        self.beta, self.temperature = beta, temperature
        self.loss = divergences.generalized_jsd_loss if reference else fastkd.functional.generalized_jsd_loss

    def forward(self, student_logits, teacher_logits, labels):
        return self.loss(student_logits, teacher_logits, labels, beta=self.beta, temperature=self.temperature)


# Functions of fastkd.functional that the benchmark times, by name -> their module here.
FUNCTIONS = {"generalized_jsd_loss": GeneralizedJSD}


def _lm_head_inputs(bt, h, v):
    def make(device, dtype, gen):
        return (_randn((bt, h), device, dtype, gen, grad=True),
                (_randn((v, h), device, dtype, gen) / h ** 0.5).requires_grad_(),
                _randn((bt, h), device, dtype, gen), _randn((v, h), device, dtype, gen) / h ** 0.5)
    return make


def _lm_logits_inputs(bt, v):
    """Both models' logits (2, BT / 2, V), of the scale of an LM head's, and labels."""
    shape = (2, bt // 2, v)

    def make(device, dtype, gen):
        labels = torch.randint(0, v, shape[:2], device=device, generator=gen)
        return _randn(shape, device, dtype, gen, grad=True), _randn(shape, device, dtype, gen), labels
    return make


def _lm_head_cases(sweep, device_type):
    """FusedLinearSoftTarget(T=2) with a dense teacher (hidden states and head weight): the
    student's hidden states and head weight train, the teacher's are fixed. bfloat16 on
    CUDA, as LM training runs: its floor's products at the bfloat16 tensor-core rate. Then
    FusedLinearDistillation on the same problems, divergence by divergence, and
    generalized_jsd_loss on logits of as many tokens."""
    out = []
    dtype = torch.bfloat16 if device_type == "cuda" else None
    shapes = _pick(_LM_HEAD, sweep, device_type)
    for bt, h, v in shapes:
        out.append(Case("FusedLinearSoftTarget", f"BT={bt} H={h} V={v}", v, "vocabulary", bt * v, (2.0,),
                        _lm_head_inputs(bt, h, v), dtype=dtype,
                        **work("FusedLinearSoftTarget", (2.0,), (bt, h), (v, h)), params={"BT": bt, "H": h, "V": v}))
    for name in divergences.DIVERGENCES:
        for bt, h, v in shapes:
            out.append(Case("FusedLinearDistillation", f"{name} BT={bt} H={h} V={v}", v, "vocabulary", bt * v,
                            (name,), _lm_head_inputs(bt, h, v), kwargs=_DIVERGENCE_OPTIONS, dtype=dtype,
                            **work("FusedLinearDistillation", (name,), (bt, h), (v, h)),
                            params={"divergence": name, "BT": bt, "H": h, "V": v}))
    for bt, _, v in shapes:
        out.append(Case("generalized_jsd_loss", f"B=2 L={bt // 2} V={v}", v, "vocabulary", bt * v, (),
                        _lm_logits_inputs(bt, v), kwargs=_GKD_OPTIONS, dtype=dtype,
                        params={"B": 2, "L": bt // 2, "V": v}))
    return out


class TinyNet(nn.Module):
    """conv3x3(3 -> C) ReLU, conv3x3 stride 2 (C -> C) ReLU -> feature map, then pool and a
    linear layer to 10 classes. forward returns (feature map, logits)."""

    def __init__(self, width):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, img):
        fm = self.features(img)
        return fm, self.head(fm.mean(dim=(2, 3)))


def _net_inputs(b, size, width, lwm):
    nets = {}

    def make(device, dtype, gen):
        key = (device, dtype)
        if key not in nets:
            torch.manual_seed(1)
            nets[key] = [TinyNet(width).to(device=device, dtype=dtype) for _ in range(2)]
        student, teacher = nets[key]
        for p in (*student.parameters(), *teacher.parameters()):
            p.grad = None
        img = _randn((b, 3, size, size), device, dtype, gen, grad=not lwm)
        target = torch.randint(0, 10, (b,), device=device, generator=gen)
        fm_s, out_s = student(img)
        fm_t, out_t = teacher(img)
        return (out_s, fm_s, out_t, fm_t, target) if lwm else (out_s, out_t, img, target)
    return make


def _net_cases(sweep, device_type):
    batches, size, width = _pick(_NET, sweep, device_type)
    out = []
    for b in batches:
        label, params = f"B={b} 3x{size}x{size}", {"B": b, "image": [3, size, size], "width": width}
        out += [Case("Sobolev", label, b, "batch", b, (), _net_inputs(b, size, width, lwm=False),
                     floor=False, params=params),
                Case("LwM", label, b, "batch", b, (), _net_inputs(b, size, width, lwm=True),
                     floor=False, params=params)]
    return out


# --- the collection's own calls ---------------------------------------------------

def collection_cases(twin=False):
    """Every call of a loss that the collection's training scripts make on CIFAR-100 (batch
    128, 100 classes, resnet20 student / resnet110 teacher, the scripts' default arguments).

    twin=True: each case's small twin, for fastkd.bench.host: batch 8, channels / 4, height
    and width / 2 (NST's choice between its two forms, which compares H W with C, holds),
    feature width / 4, CRD's negatives and bank cut down. Its code path is the case's (the
    host harness checks the backend choice); its arithmetic is a few microseconds.
    """
    b, k, div, hw_div = (8, 100, 4, 2) if twin else (128, 100, 1, 1)

    def fm(c, h):
        return (b, c // div, h // hw_div, h // hw_div)
    stem, rb1, rb2, rb3 = fm(16, 32), fm(16, 32), fm(32, 16), fm(64, 8)
    feat, out = (b, 64 // div), (b, k)
    blocks = (("rb1", rb1), ("rb2", rb2), ("rb3", rb3))

    def case(loss, call, args, make, size, shape=None, inputs=None, **kw):
        numel = {op: math.prod(size) for op in registry.METHODS[loss]}
        return Case(loss, f"{call} {shape or _map_label(size)}", size[0], "batch", math.prod(size), args, make,
                    monotone=False, params={"call": call, "shape": list(size)}, numel=numel,
                    **work(loss, args, *(inputs or [size])), **kw)

    out_cases = [case("Logits", "out", (), _pair(out), out, f"{b}x{k}"),
                 case("SoftTarget", "out", (4.0,), _pair(out), out, f"{b}x{k}"),
                 case("BSS", "attacked out", (3.0,), _pair((b // 4, k)), (b // 4, k), f"{b // 4}x{k}"),
                 case("DML", "out", (), _pair(out), out, f"{b}x{k}")]
    for name, shape in blocks:
        c = shape[1]
        out_cases += [case("AT", name, (2.0,), _pair(shape), shape),
                      case("SP", name, (), _pair(shape), shape),
                      case("AB", name, (2.0,), _pair(shape), shape),
                      case("VID", name, (c, c, c, 5.0), _pair(shape), shape),
                      case("OFD", name, (c, c), _pair(shape), shape),
                      case("AFD", name, (c, 1.0), _pair(shape), shape)]
    for first, second, label in ((stem, rb1, "stem>rb1"), (rb1, rb2, "rb1>rb2"), (rb2, rb3, "rb2>rb3")):
        def make(device, dtype, gen, first=first, second=second):
            return (_randn(first, device, dtype, gen, grad=True), _randn(second, device, dtype, gen, grad=True),
                    _randn(first, device, dtype, gen), _randn(second, device, dtype, gen))
        # The blocks' names give the maps' sizes (rb1 32x32, rb2 16x16, rb3 8x8).
        out_cases.append(case("FSP", label, (), make, first, f"B={b} C={first[1]}>{second[1]}",
                              inputs=[first, second]))
    out_cases += [case("Hint", "rb3", (), _pair(rb3), rb3), case("NST", "rb3", (), _pair(rb3), rb3)]
    # FT: the paraphraser's and translator's factors at rb3, k = 0.5 (train_ft.py).
    factor = (b, rb3[1] // 2, rb3[2], rb3[3])
    out_cases.append(case("FT", "factor", (), _pair(factor), factor))
    for loss, args in (("PKTCosSim", ()), ("RKD", (25.0, 50.0)), ("CC", (0.4, 2))):
        out_cases.append(case(loss, "feat", args, _pair(feat), feat, f"N={b} D={feat[1]}"))
    irg = [rb2, rb3, feat, out]

    def make_irg(device, dtype, gen):
        return ([_randn(sh, device, dtype, gen, grad=True) for sh in irg],
                [_randn(sh, device, dtype, gen) for sh in irg])
    out_cases.append(case("IRG", "rb2,rb3,feat,out", (0.1, 5.0, 5.0), make_irg, rb2, f"N={b}", inputs=irg))
    out_cases[-1].numel["irg_vertex"] = math.prod(out)
    # CRD (train_crd.py): feat (B, 64) of both nets, 16384 negatives, 50000 CIFAR images.
    nce_n, feat_dim, n_data = (64, 16, 1000) if twin else (16384, 128, 50000)

    def make_crd(device, dtype, gen):
        idx = torch.randint(0, n_data, (b,), device=device, generator=gen)
        sample_idx = torch.randint(0, n_data, (b, nce_n + 1), device=device, generator=gen)
        sample_idx[:, 0] = idx
        return _randn(feat, device, dtype, gen, grad=True), _randn(feat, device, dtype, gen), idx, sample_idx
    out_cases.append(case("CRD", "feat", (feat[1], feat[1], feat_dim, nce_n, 0.1, 0.5, n_data), make_crd, feat,
                          f"B={b} n={nce_n} d={feat_dim}"))
    # Sobolev (the image gradients) and LwM (rb2's Grad-CAM) through a network: a tiny one.
    size, width = (8, 4) if twin else (32, 16)
    net = f"B={b} 3x{size}x{size}"
    out_cases += [case("Sobolev", "out,img", (), _net_inputs(b, size, width, lwm=False), (b, 3, size, size), net,
                       floor=False),
                  case("LwM", "out,fm", (), _net_inputs(b, size, width, lwm=True), (b, 3, size, size), net,
                       floor=False)]
    return out_cases


def _quick_cases(device_type):
    """One case per loss: its first call in the collection's scripts (collection_cases), except
    CRD, at 4096 negatives for a batch of 32 (the scripts' 16384 for 128 gather 1 GiB in the
    reference: seconds per call on a CPU), and Sobolev and LwM, through the tiny net at batch 32."""
    first = {}
    for case in collection_cases() + _crd_cases("quick", device_type) + _net_cases("quick", device_type):
        if case.loss in ("CRD", "Sobolev", "LwM") and case.params.get("call"):
            continue
        first.setdefault(case.loss, case)
    return list(first.values())


def canonical(name):
    """The method name for a spelling given to --losses; ValueError if unknown."""
    lookup = {n.lower(): n for n in LOSSES}
    lookup.update({a.lower(): n for a, n in ALIASES.items()})
    try:
        return lookup[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}") from None


def cases(sweep="quick", device_type="cpu", losses=None):
    """The cases of a sweep for a device type ("cpu" or "cuda"): by loss in LOSSES order,
    then in sweep order (batch or classes ascending; feature maps layer by layer).

    losses: method names (or aliases) to keep; None keeps the collection's 21 (the losses
    beyond it, FusedLinearSoftTarget, FusedLinearDistillation and generalized_jsd_loss, run
    when named).
    """
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}; got {sweep!r}")
    keep = set(registry.LOSSES) if losses is None else {canonical(n) for n in losses}
    every = collection_cases() if sweep in ("collection", "full") else []
    if sweep == "quick":
        every = _quick_cases(device_type)
    elif sweep != "collection":
        every += (_logit_cases(sweep, device_type) + _pairwise_cases(sweep, device_type)
                  + _map_cases(sweep, device_type) + _crd_cases(sweep, device_type)
                  + _net_cases(sweep, device_type))
    every += _lm_head_cases(sweep, device_type)
    order = {n: i for i, n in enumerate(LOSSES)}
    picked = [c for c in every if c.loss in keep]
    return sorted(picked, key=lambda c: order[c.loss])
