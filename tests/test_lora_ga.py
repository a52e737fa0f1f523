"""LoRA-GA (`hf_ext.peft.get_lora_ga_model`): the paper's formula in float64, the streamed SVD against
torch.svd_lowrank, output invariance, the first SGD step, portable saving on the untouched base, PEFT's built-in."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ext.ops.lora_ga import lora_ga_factors
from hf_ext.peft import PartlyFrozenLinear, get_lora_ga_model
from hf_ext.peft.gradient_sketch import (
    _LayerSinglePassSketch,
    chunked_causal_lm_loss,
    default_loss,
    gradient_singular_vectors,
    model_loss_for,
)

VOCAB = 61


def tiny_llama(dtype=torch.float32, hidden=32, intermediate=48, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def token_batches(count=4, batch=2, length=12, seed=1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count * batch, length), generator=generator)
    return [{"input_ids": ids[i:i + batch], "labels": ids[i:i + batch]} for i in range(0, count * batch, batch)]


def causal_lm_loss(model, batch) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted, -100 ignored, mean over targets) in the model's dtype:
    `model(**batch).loss` casts the logits to float32 even in a float64 model."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def mean_gradients(model, batches, names) -> dict[str, torch.Tensor]:
    """Explicit mean over batches of d loss / d weight for the named Linear modules (autograd, model dtype)."""
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    for batch in batches:
        causal_lm_loss(model, batch).backward()
    grads = {name: w.grad / len(batches) for name, w in weights.items()}
    for w in weights.values():
        w.grad = None
    return grads


def lora_ga_layers(peft_model):
    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def assert_same_up_to_sign(actual, expected, dim, atol):
    """Rows (dim=0) or columns (dim=1) equal up to a sign each (singular vectors are defined up to sign)."""
    signs = torch.sign((actual * expected).sum(dim=1 - dim, keepdim=True))
    torch.testing.assert_close(actual * signs, expected, atol=atol, rtol=0)


@pytest.mark.smoke
def test_factors_equal_the_papers_formula_in_float64():
    r, gamma = 8, 16.0  # q = min(4r, out, in) covers every layer: the randomized SVD is exact here
    model, batches = tiny_llama(torch.float64), token_batches()
    reference_model = copy.deepcopy(model)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])
    peft_model = get_lora_ga_model(model, config, batches, stable_gamma=gamma, show_progress=False)
    layers = lora_ga_layers(peft_model)
    grads = mean_gradients(reference_model, batches, layers)
    for name, layer in layers.items():
        u, _, vh = torch.linalg.svd(grads[name])
        out_features = grads[name].shape[0]
        factor = out_features ** 0.25 / gamma ** 0.5
        expected_a, expected_b = vh[:r] * factor, u[:, r:2 * r] * factor  # A = V[:, :r]ᵀ, B = U[:, r:2r]
        assert_same_up_to_sign(layer.lora_A["default"].trainable, expected_a, dim=0, atol=1e-9)
        assert_same_up_to_sign(layer.lora_B["default"].trainable, expected_b, dim=1, atol=1e-9)
        # the offset halves are the initial factors, negated on the B side
        torch.testing.assert_close(layer.lora_A["default"].frozen, layer.lora_A["default"].trainable, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B["default"].frozen, -layer.lora_B["default"].trainable, rtol=0, atol=0)


def test_streamed_singular_vectors_equal_svd_lowrank_of_the_explicit_gradient():
    # hidden 64, q = 8: a genuinely randomized range finder, on tall (48×64 → transposed) and square layers
    model, batches = tiny_llama(hidden=64), token_batches()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    modules = dict(model.named_modules())
    grads = mean_gradients(copy.deepcopy(model), batches, names)
    vectors = gradient_singular_vectors(model, {n: modules[n] for n in names}, batches, default_loss,
                                        q={n: 8 for n in names}, power_iterations=2, seed=5, show_progress=False)
    for name in names:
        torch.manual_seed(5)
        u, s, v = torch.svd_lowrank(grads[name], q=8, niter=2)
        ours_u, ours_s, ours_v = vectors[name]
        torch.testing.assert_close(ours_s, s, rtol=1e-4, atol=1e-7)
        assert_same_up_to_sign(ours_u[:, :4], u[:, :4], dim=1, atol=1e-4)
        assert_same_up_to_sign(ours_v[:, :4], v[:, :4], dim=1, atol=1e-4)


def single_pass_sketch_of(gradient: torch.Tensor, k: int, seed: int):
    """Tropp et al. (2017)'s one-pass two-sided sketch of an explicit matrix, written out in float64 from the paper:
    Y = TΩ, W = ΨT, Q = orth(Y), X = (ΨQ)⁺W, T ≈ QX; T is the tall orientation, Ω and Ψ drawn in that order."""
    transposed = gradient.shape[0] < gradient.shape[1]
    tall = (gradient.T if transposed else gradient).double()
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(tall.shape[1], k, generator=generator, dtype=gradient.dtype).double()
    psi = torch.randn(min(2 * k + 1, tall.shape[0]), tall.shape[0], generator=generator, dtype=gradient.dtype).double()
    basis = torch.linalg.qr(tall @ omega).Q
    core = torch.linalg.pinv(psi @ basis) @ (psi @ tall)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    left, right = basis @ u, vh.T
    return (right, s, left) if transposed else (left, s, right)


def test_one_pass_sketch_equals_the_papers_sketch_of_the_explicit_gradient():
    # k = 12 of 32/64 columns: a genuine sketch, on a transposed (k_proj 32×64), a square and a tall (gate 128×64) layer
    model, batches = tiny_llama(hidden=64, intermediate=128), token_batches()
    names = ["model.layers.1.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"]
    modules = dict(model.named_modules())
    grads = mean_gradients(copy.deepcopy(model), batches, names)
    vectors = gradient_singular_vectors(model, {n: modules[n] for n in names}, batches, default_loss,
                                        q={n: 12 for n in names}, power_iterations=None, seed=7, show_progress=False)
    for name in names:
        u, s, v = single_pass_sketch_of(grads[name], 12, seed=7)
        ours_u, ours_s, ours_v = vectors[name]
        assert ours_u.shape == (grads[name].shape[0], 12) and ours_v.shape == (grads[name].shape[1], 12)
        torch.testing.assert_close(ours_s.double(), s, rtol=1e-4, atol=1e-8)
        assert_same_up_to_sign(ours_u[:, :4].double(), u[:, :4], dim=1, atol=1e-4)
        assert_same_up_to_sign(ours_v[:, :4].double(), v[:, :4], dim=1, atol=1e-4)
    # the sketch is not the exact SVD at this width (the test above would pass for any exact method)
    exact_s = torch.linalg.svdvals(grads[names[2]].double())
    assert (vectors[names[2]][1][:12].double() - exact_s[:12]).abs().max() > 1e-4 * exact_s[0]


def test_one_pass_keeps_the_gradient_itself_where_the_sketch_would_be_no_smaller():
    # q = 32 columns: v_proj (32×64) would need a 32·64 + 64·32 sketch for its 32·64 gradient, q_proj (64×64) a
    # 32·64 + 64·64 one for 64·64: both accumulate G and take svd_lowrank's algorithm on it, 2·keep = 12 columns and
    # 4 power iterations (PEFT's computation for LoRA-GA)
    model, batches = tiny_llama(hidden=64), token_batches()
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
    modules = dict(model.named_modules())
    assert all(_LayerSinglePassSketch.numel(*modules[n].weight.shape, 32) >= modules[n].weight.numel() for n in names)
    grads = mean_gradients(copy.deepcopy(model), batches, names)
    rng_state = torch.random.get_rng_state()
    vectors = gradient_singular_vectors(model, {n: modules[n] for n in names}, batches, default_loss,
                                        q={n: 32 for n in names}, keep={n: 6 for n in names}, power_iterations=None,
                                        seed=2, show_progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # drawn from its own generator
    for name in names:
        torch.manual_seed(2)
        u, s, v = torch.svd_lowrank(grads[name], q=12, niter=4)
        ours_u, ours_s, ours_v = vectors[name]
        assert ours_u.shape == (grads[name].shape[0], 6) and ours_s.shape == (6,) and ours_v.shape[1] == 6
        torch.testing.assert_close(ours_s, s[:6], rtol=1e-4, atol=1e-7)
        assert_same_up_to_sign(ours_u[:, :4], u[:, :4], dim=1, atol=1e-4)
        assert_same_up_to_sign(ours_v[:, :4], v[:, :4], dim=1, atol=1e-4)


def test_recomputed_decoder_layers_give_the_same_vectors_and_the_model_back_as_it_was():
    """Each decoder layer is re-run during backward (its first run keeps nothing), the cache is off meanwhile, and
    the singular vectors equal those of the run that keeps every activation."""
    model, batches = tiny_llama(torch.float64, hidden=64), token_batches()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    modules = dict(model.named_modules())
    calls = []
    # A module inside the layer: the layer's own hooks run once, around the checkpointed call.
    model.model.layers[1].mlp.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    layer_0 = model.model.layers[0]
    layer_0.forward = instance_forward = functools.partial(type(layer_0).forward, layer_0)  # as accelerate's hooks do
    results = {}
    for recompute in (False, True):
        calls.clear()
        results[recompute] = gradient_singular_vectors(model, {n: modules[n] for n in names}, batches, default_loss,
                                                       q={n: 8 for n in names}, power_iterations=1, seed=3,
                                                       show_progress=False, recompute_blocks=recompute)
        passes = 4 * len(batches)
        assert calls == ([False, True] * passes if recompute else [True] * passes)
    for name in names:
        for ours, kept in zip(results[True][name], results[False][name]):
            torch.testing.assert_close(ours, kept, rtol=0, atol=1e-10)
    assert "forward" not in vars(model.model.layers[1]) and model.config.use_cache is True
    assert layer_0.forward is instance_forward


def test_the_chunked_loss_is_the_models_own_loss_with_the_same_gradients():
    """LoRA-GA's default loss for Llama-style models never builds the logits; it is transformers' causal-LM loss
    (labels shifted, -100 ignored), value and gradients, and models whose logits are more than lm_head(hidden)
    keep their own loss."""
    model, batches = tiny_llama(torch.float64), token_batches()
    batch = dict(batches[0], labels=batches[0]["labels"].clone())
    batch["labels"][0, :5] = -100
    assert model_loss_for(model) is chunked_causal_lm_loss
    parameters = [p for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(default_loss(model, batch), causal_lm_loss(model, batch).float())  # the reference
    expected = causal_lm_loss(model, batch)
    expected_grads = torch.autograd.grad(expected, parameters)
    loss = chunked_causal_lm_loss(model, batch)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(loss, parameters), expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    model.config.logit_scale = 0.5
    assert model_loss_for(model) is default_loss


def test_output_unchanged_at_init_and_base_weights_untouched():
    model, batches = tiny_llama(), token_batches()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = batches[0]["input_ids"]
    expected = model(ids).logits
    config = LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear", lora_dropout=0.1)
    peft_model = get_lora_ga_model(model, config, batches, show_progress=False).eval()
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=1e-5)
    for key, value in peft_model.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, original[key.replace("base_layer.", "")]), key



def test_all_linear_targets_the_layers_peft_targets():
    # "all-linear" is expanded as PEFT's get_peft_model expands it: every nn.Linear but the output head.
    ours = get_lora_ga_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"), token_batches(),
                             show_progress=False)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(lora_ga_layers(ours)) == sorted(lora_ga_layers(theirs))
    assert len(lora_ga_layers(ours)) == 7 * 2 and "lm_head" not in lora_ga_layers(ours)

def test_first_sgd_step_moves_the_weights_along_the_top_2r_gradient():
    # One SGD step on (A, B) changes s·BA by -η s² c² U_2r Σ_2r V_2rᵀ + O(η²) (LoRA-GA, arXiv 2407.05000, §3)
    r, gamma, lr = 8, 16.0, 1e-4  # q = 4r covers the 32 input dims: an exact SVD
    model, batches = tiny_llama(torch.float64), token_batches()
    grads = mean_gradients(copy.deepcopy(model), batches, ["model.layers.0.mlp.up_proj"])
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["up_proj"])
    peft_model = get_lora_ga_model(model, config, batches, stable_gamma=gamma,
                                   show_progress=False)
    layer = lora_ga_layers(peft_model)["model.layers.0.mlp.up_proj"]
    scaling = layer.scaling["default"]
    delta_before = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        (peft_model(**batch).loss / len(batches)).backward()
    optimizer.step()
    delta_after = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    grad = grads["model.layers.0.mlp.up_proj"]
    u, s, vh = torch.linalg.svd(grad)
    top_2r = u[:, :2 * r] @ torch.diag(s[:2 * r]) @ vh[:2 * r]
    factor_squared = grad.shape[0] ** 0.5 / gamma
    step = scaling * (delta_after - delta_before) / (-lr * scaling ** 2 * factor_squared)
    relative = (step - top_2r).norm() / top_2r.norm()
    assert relative < 1e-3, relative
    assert (top_2r - grad).norm() / grad.norm() > 0.1  # the rank-2r part is not the whole gradient


@pytest.mark.smoke
def test_saved_adapter_is_plain_rank_2r_lora_that_reproduces_the_trained_model_on_the_untouched_base(tmp_path):
    base, batches = tiny_llama(), token_batches()
    pristine = copy.deepcopy(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.05)
    peft_model = get_lora_ga_model(base, config, batches, show_progress=False)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches * 3:
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    ids = batches[0]["input_ids"]
    trained_logits = peft_model(ids).logits
    assert (trained_logits - pristine(ids).logits).abs().max() > 1e-2  # training did something
    peft_model.save_pretrained(tmp_path / "lora_ga")

    saved = LoraConfig.from_pretrained(tmp_path / "lora_ga")
    assert saved.r == 4 and saved.lora_alpha == 8 and saved.peft_type == "LORA"
    # Loads without hf_ext's classes: a plain PEFT LoRA model on the original weights
    reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "lora_ga").eval()
    assert not any(isinstance(m, PartlyFrozenLinear) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(ids).logits, trained_logits, rtol=0, atol=1e-5)

    # Coexists with another adapter on the same base; switching gives each adapter's own model
    other = get_peft_model(copy.deepcopy(pristine), LoraConfig(r=3, target_modules=["q_proj"],
                                                               init_lora_weights="gaussian"))
    other.save_pretrained(tmp_path / "other")
    other_logits = other.eval()(ids).logits
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    reloaded.set_adapter("other")
    torch.testing.assert_close(reloaded(ids).logits, other_logits, rtol=0, atol=1e-6)
    reloaded.set_adapter("default")
    torch.testing.assert_close(reloaded(ids).logits, trained_logits, rtol=0, atol=1e-5)
    with reloaded.disable_adapter():
        torch.testing.assert_close(reloaded(ids).logits, pristine(ids).logits, rtol=0, atol=0)


def test_only_the_rank_r_halves_train():
    model, batches = tiny_llama(), token_batches()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_lora_ga_model(model, config, batches, show_progress=False)
    layers = lora_ga_layers(peft_model)
    frozen_before = {n: (l.lora_A["default"].frozen.clone(), l.lora_B["default"].frozen.clone()) for n, l in layers.items()}
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == sum(2 * (l.in_features + l.out_features) for l in layers.values())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for batch in batches:
        peft_model(**batch).loss.backward()
        optimizer.step()
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].frozen, frozen_before[name][0])
        assert torch.equal(layer.lora_B["default"].frozen, frozen_before[name][1])


@pytest.mark.smoke
def test_differs_from_peft_builtin_only_by_the_documented_scaling_and_base_mutation():
    # PEFT 0.21's init_lora_weights="lora_ga": B = U[:, r:2r]·diag(S[r:2r])·c, A = V[:, :r]ᵀ (no factor c), and W0
    # is changed in place. Ours (the paper's): both factors × c, no singular values, W0 untouched.
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    r, gamma = 8, 16.0  # exact SVD for every layer (q = min(4r, out, in)), so both sides see the same vectors
    model, batches = tiny_llama(torch.float64), token_batches()
    peft_base = copy.deepcopy(model)
    targets = ["q_proj", "up_proj"]
    ours = get_lora_ga_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=targets), batches,
                             stable_gamma=gamma, show_progress=False)
    peft_config = LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=gamma))
    original_weight = peft_base.model.layers[0].mlp.up_proj.weight.clone()
    preprocess_loraga(peft_base, peft_config, train_step=lambda: [peft_base(**b).loss.backward() for b in batches])
    theirs = get_peft_model(peft_base, peft_config)
    ours_layers, their_layers = lora_ga_layers(ours), lora_ga_layers(theirs)
    for name, layer in ours_layers.items():
        out_features = layer.out_features
        factor = out_features ** 0.25 / gamma ** 0.5
        our_a, our_b = layer.lora_A["default"].trainable, layer.lora_B["default"].trainable
        their_a, their_b = their_layers[name].lora_A["default"].weight, their_layers[name].lora_B["default"].weight
        assert_same_up_to_sign(their_a, our_a / factor, dim=0, atol=1e-5)  # PEFT runs its SVD in fp32
        singular_values = their_b.norm(dim=0) / factor  # PEFT's B columns have norm S[r+i]·c
        assert_same_up_to_sign(their_b, our_b * singular_values, dim=1, atol=1e-6)
        assert singular_values.max() < 1e-1  # so PEFT's B starts near zero, ours at norm c
    assert not torch.equal(theirs.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight, original_weight)
    assert torch.equal(ours.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight, original_weight)


@pytest.mark.parametrize("bad, message", [
    (dict(use_dora=True), "use_dora"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(bias="all"), "bias"),
    (dict(r=20), "r=20 is too large"),
    (dict(target_modules=["embed_tokens"]), "linear target layers only"),
])
def test_bad_configs_are_refused_with_the_field_named(bad, message):
    settings = dict(r=2, lora_alpha=4, target_modules=["q_proj"])
    settings.update(bad)
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        get_lora_ga_model(model, LoraConfig(**settings), token_batches(), show_progress=False)
    assert not any("lora" in name for name, _ in model.named_modules())  # the caller's model is given back as it was


def test_bad_arguments_are_refused():
    model, config = tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="num_gradient_batches"):
        get_lora_ga_model(model, config, token_batches(), num_gradient_batches=0)
    with pytest.raises(ValueError, match="direction"):
        get_lora_ga_model(model, config, token_batches(), direction="BrA2r")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"power_iterations must be None \(one pass, the default\) or an int"):
            get_lora_ga_model(model, config, token_batches(), power_iterations=bad)
    with pytest.raises(ValueError, match="no batches"):
        get_lora_ga_model(model, config, [])
    with pytest.raises(ValueError, match="returned no loss"):
        get_lora_ga_model(model, config, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], show_progress=False)
    with pytest.raises(TypeError, match="not a PeftModel"):
        get_lora_ga_model(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), config, [])
    with pytest.raises(ValueError, match="rank must be"):
        lora_ga_factors(torch.eye(4), torch.eye(4), 3, scaling=1.0)


@pytest.mark.parametrize("autocast", [True, False])
def test_peft_keywords_adapter_name_and_autocast_adapter_dtype(autocast):
    """As in get_peft_model: autocast_adapter_dtype=True keeps a bfloat16 base's adapter in float32, False in
    bfloat16; adapter_name names the adapter."""
    model, batches = tiny_llama(dtype=torch.bfloat16), token_batches(count=2)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_lora_ga_model(model, config, batches, num_gradient_batches=2, adapter_name="ga",
                                   autocast_adapter_dtype=autocast, show_progress=False)
    adapter = [p for name, p in peft_model.named_parameters() if ".ga." in name and "lora_" in name]
    assert adapter and {p.dtype for p in adapter} == {torch.float32 if autocast else torch.bfloat16}
    assert peft_model.active_adapters == ["ga"]
