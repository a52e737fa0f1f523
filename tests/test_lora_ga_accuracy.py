"""How close LoRA-GA's streamed randomized SVDs (the default single pass: a sketch of width 32r, or the resident
gradient where that is smaller, as for q_proj and v_proj here; and the range finder with one power iteration, 4
passes) come to the exact singular subspaces of the explicit mean gradient, on the real SmolLM2-135M and English text.

The factors use the top-r right singular vectors (A) and the left ones r+1..2r (B, direction "ArB2r"), so those two
subspaces are compared, as the mean squared cosine of their principal angles (1: the same subspace).
"""

import pytest
import torch

from benchmarks.tasks.assets import load_smollm2
from benchmarks.tasks.finetuning_data import tutorial_batches
from hf_ext.peft.gradient_sketch import default_loss, gradient_singular_vectors, model_loss_for
from hf_ext.peft.lora_ga import RANGE_FINDER_WIDTH, SINGLE_PASS_WIDTH

RANK = 8
CHECKED = [f"model.layers.{i}.{name}" for i in (0, 15, 29)
           for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return float((qa.T @ qb).norm() ** 2 / a.shape[1])


@pytest.fixture(scope="module")
def model_batches_and_exact_vectors():
    model, tokenizer = load_smollm2()
    model.eval().requires_grad_(False)
    batches = tutorial_batches(tokenizer, 2, 2, 128)
    modules = dict(model.named_modules())
    for name in CHECKED:
        modules[name].weight.requires_grad_(True)
    for batch in batches:
        default_loss(model, batch).backward()  # the model's own loss, explicit weight gradients
    exact = {}
    for name in CHECKED:
        weight = modules[name].weight
        u, _, vh = torch.linalg.svd(weight.grad.double() / len(batches), full_matrices=False)
        exact[name] = (u, vh.T)
        weight.grad = None
        weight.requires_grad_(False)
    return model, batches, exact


@pytest.mark.parametrize("power_iterations, width, a_bound, b_bound",
                         [(None, SINGLE_PASS_WIDTH, 0.97, 0.8), (1, RANGE_FINDER_WIDTH, 0.97, 0.8)])
def test_streamed_subspaces_are_close_to_the_exact_svd(model_batches_and_exact_vectors, power_iterations, width,
                                                       a_bound, b_bound):
    model, batches, exact = model_batches_and_exact_vectors
    modules = dict(model.named_modules())
    vectors = gradient_singular_vectors(model, {name: modules[name] for name in CHECKED}, batches,
                                        model_loss_for(model),
                                        q={name: min(width * RANK, *modules[name].weight.shape) for name in CHECKED},
                                        power_iterations=power_iterations, seed=0, show_progress=False)
    a_overlaps, b_overlaps = [], []
    for name in CHECKED:
        left, _, right = vectors[name]
        exact_left, exact_right = exact[name]
        a_overlaps.append(subspace_overlap(right[:, :RANK], exact_right[:, :RANK]))
        b_overlaps.append(subspace_overlap(left[:, RANK:2 * RANK], exact_left[:, RANK:2 * RANK]))
    assert min(a_overlaps) >= a_bound, a_overlaps
    assert min(b_overlaps) >= b_bound, b_overlaps
