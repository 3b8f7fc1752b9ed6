"""FusedLinearSoftTarget on Hugging Face GPT-2 models (random tiny configs; runs where
transformers is installed): from the last hidden states and the tied LM-head weights it
gives the loss and the student's gradients that fastkd.reference.SoftTarget and
cross_entropy give on the models' own materialised logits, padding ignored."""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from test_fused_linear import FAST

transformers = pytest.importorskip("transformers", reason="FusedLinearSoftTarget on Hugging Face models: "
                                   "transformers is not installed")


@pytest.mark.parametrize("backend", FAST)
def test_matches_the_models_own_logits(backend):
    torch.manual_seed(0)
    V = 300

    def model(width, layers):  # eval: no dropout, so two forward passes agree
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=width, n_layer=layers, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    teacher, student = model(64, 2), model(32, 2)
    ids = torch.randint(0, V, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    with torch.no_grad():
        out_t = teacher(ids, attention_mask=mask, output_hidden_states=True)
    out_s = student(ids, attention_mask=mask, output_hidden_states=True)
    with fastkd.use_backend(backend):
        loss = fastkd.FusedLinearSoftTarget(2.0, hard_weight=0.5, chunk_size=8)(
            out_s.hidden_states[-1][:, :-1], student.lm_head.weight, out_t.hidden_states[-1][:, :-1],
            teacher.lm_head.weight, labels)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    z_s = student(ids, attention_mask=mask).logits[:, :-1].reshape(-1, V)
    z_t = out_t.logits[:, :-1].reshape(-1, V)
    y = labels.reshape(-1)
    kept = y != -100
    ref = fastkd.reference.SoftTarget(2.0)(z_s[kept], z_t[kept]) + 0.5 * F.cross_entropy(z_s, y, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_distillation_step_compiles_whole():
    """Both GPT-2 models and the loss in one torch.compile(fullgraph=True) graph (the auto
    backend's operator, fastkd.device_ops): the eager loss and student gradients."""
    torch.manual_seed(0)
    V = 300

    def model(width):
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=width, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    teacher, student = model(64), model(32)
    ids = torch.randint(0, V, (3, 16))
    labels = ids[:, 1:].clone()
    labels[1, 9:] = -100
    loss_fn = fastkd.FusedLinearSoftTarget(2.0, hard_weight=0.5, chunk_size=8)

    def step(ids, labels):
        with torch.no_grad():
            h_t = teacher.transformer(ids).last_hidden_state
        h_s = student.transformer(ids).last_hidden_state
        return loss_fn(h_s[:, :-1], student.lm_head.weight, h_t[:, :-1], teacher.lm_head.weight, labels)
    expected = step(ids, labels)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, list(student.parameters())), expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
