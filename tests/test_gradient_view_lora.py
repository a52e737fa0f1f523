"""GradientViewLoRA: LoRA done in the optimizer — PEFT LoRA's trajectory, the resampled update's expectation,
gradient accumulation, exact resume, Trainer."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from hf_ext.optim import GradientViewLoRA, gradient_view_optimizer_cls_and_kwargs
from test_lora_ga import tiny_llama, token_batches
from test_lora_ga_integration import _TokenDataset

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _target_weights(model):
    return {name.removesuffix(".weight"): p for name, p in model.named_parameters()
            if name.endswith(".weight") and name.split(".")[-2] in TARGETS}


@pytest.mark.parametrize("base, options", [(torch.optim.SGD, dict(lr=0.5)),
                                           (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))])
@pytest.mark.smoke
def test_lora_mode_follows_peft_lora(base, options):
    r, alpha = 4, 8
    model, batches = tiny_llama(torch.float64), token_batches()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                                 init_lora_weights="gaussian"))
    peft_optimizer = base([p for p in peft_model.parameters() if p.requires_grad], **options)

    for p in model.parameters():
        p.requires_grad_(False)
    weights = _target_weights(model)
    for w in weights.values():
        w.requires_grad_(True)
    optimizer = GradientViewLoRA(list(weights.values()), rank=r, scaling=alpha / r, base_optimizer=base, **options)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and "default" in m.lora_A}
    for name, w in weights.items():  # the same initialisation: PEFT's A and B (B gaussian-initialised is 0)
        optimizer.state[w]["lora_A"].copy_(peft_layers[name].lora_A["default"].weight.detach())
        optimizer.state[w]["lora_B"].copy_(peft_layers[name].lora_B["default"].weight.detach())
        assert optimizer.state[w]["lora_B"].abs().max() == 0

    for batch in batches * 2:
        peft_loss = peft_model(**batch).loss
        peft_loss.backward()
        peft_optimizer.step()
        peft_optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert abs(loss.item() - peft_loss.item()) < 1e-10
    moved = 0.0
    for name, w in weights.items():
        layer = peft_layers[name]
        effective = layer.base_layer.weight + layer.scaling["default"] * (
            layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        torch.testing.assert_close(w.detach(), effective.detach(), rtol=0, atol=1e-10)
        moved = max(moved, (w.detach() - layer.base_layer.weight).abs().max().item())
    assert moved > 1e-3


def test_fixed_a_trains_only_b():
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    optimizer = GradientViewLoRA([w], rank=2, mode="fixed_a", base_optimizer=torch.optim.SGD, lr=0.1)
    a_before = optimizer.state[w]["lora_A"].clone()
    for _ in range(3):
        (w.sum(1) ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(optimizer.state[w]["lora_A"], a_before)
    assert optimizer.state[w]["lora_B"].abs().max() > 0
    assert len(optimizer.base.param_groups[0]["params"]) == 1  # B only: no state for A


def test_resample_step_is_the_full_gradient_in_expectation():
    # One SGD step from zero factors moves W by -η s² (G vᵀv + u uᵀG); E[...] = -2 η s² G (kexue.fm post 9590)
    torch.manual_seed(0)
    m, n, r, lr, samples = 7, 5, 2, 0.1, 3000
    grad = torch.randn(m, n, dtype=torch.float64)
    total = torch.zeros(m, n, dtype=torch.float64)
    ranks = []
    for seed in range(samples):
        w = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
        optimizer = GradientViewLoRA([w], rank=r, mode="resample", base_optimizer=torch.optim.SGD, lr=lr, seed=seed)
        w.grad = grad.clone()
        optimizer.step()
        total += w.detach()
        if seed < 5:
            ranks.append(torch.linalg.matrix_rank(w.detach()).item())
    mean_update = total / samples
    expected = -2 * lr * grad
    relative = ((mean_update - expected).norm() / expected.norm()).item()
    assert relative < 0.1, relative  # ~ 1/√samples noise
    assert max(ranks) <= 2 * r  # each step is low-rank


def test_resample_accumulates_a_high_rank_update_with_low_rank_state():
    torch.manual_seed(0)
    target = torch.randn(12, 10, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(12, 10, dtype=torch.float64))
    # lr small enough for ‖u‖² + ‖v‖² ≈ m/r + n/r, the curvature a rank-1 period sees
    optimizer = GradientViewLoRA([w], rank=1, mode="resample", resample_every=5, base_optimizer=torch.optim.SGD,
                                 lr=0.02)
    for _ in range(600):
        ((w - target) ** 2).sum().mul(0.5).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.linalg.matrix_rank(w.detach()).item() == 10
    assert (w.detach() - target).norm() / target.norm() < 0.05
    state_sizes = {k: v.numel() for k, v in optimizer.state[w].items() if torch.is_tensor(v)}
    assert state_sizes["lora_B"] == 12 and state_sizes["lora_A"] == 10


@pytest.mark.parametrize("mode", ["lora", "resample"])
def test_gradient_accumulation_is_exact(mode):
    model = torch.nn.Linear(8, 6, bias=False).double()
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    results = []
    for micro_batches in (1, 2, 4):
        m = copy.deepcopy(model)
        optimizer = GradientViewLoRA(m.parameters(), rank=2, mode=mode, lr=1e-2, resample_every=2)
        for _ in range(3):
            for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                (((m(xb) - yb) ** 2).sum() / 4).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append(m.weight.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=1e-12)


def test_state_dict_resume_is_bit_identical_across_a_resampling():
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        return model, GradientViewLoRA(model.parameters(), rank=2, mode="resample", resample_every=3, lr=1e-2)

    def train(model, optimizer, steps):
        for step in steps:
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    full, full_optimizer = fresh()
    train(full, full_optimizer, range(5))  # resamples after step 3

    first, first_optimizer = fresh()
    train(first, first_optimizer, range(2))
    saved_weights, saved_state = copy.deepcopy(first.state_dict()), copy.deepcopy(first_optimizer.state_dict())
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(saved_weights)
    resumed_optimizer.load_state_dict(saved_state)
    train(resumed, resumed_optimizer, range(2, 5))
    for expected, actual in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)


@pytest.mark.smoke
def test_trainer_factory_trains_and_respects_weight_decay_groups(tmp_path):
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=5e-3,
                             weight_decay=0.1, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(16),
                      optimizer_cls_and_kwargs=gradient_view_optimizer_cls_and_kwargs(args, rank=2, mode="resample",
                                                                                       resample_every=3))
    before = trainer.evaluate(_TokenDataset(16))["eval_loss"]
    trainer.train()
    assert trainer.evaluate(_TokenDataset(16))["eval_loss"] < before
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, GradientViewLoRA)
    assert sorted(g["weight_decay"] for g in optimizer.base.param_groups) == [0.0, 0.1]


def test_bad_arguments_are_refused():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        GradientViewLoRA([w], rank=2, mode="galore")
    with pytest.raises(ValueError, match="rank=5 is larger"):
        GradientViewLoRA([w], rank=5)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        GradientViewLoRA([w], rank=0)
    with pytest.raises(ValueError, match="resample_every"):
        GradientViewLoRA([w], rank=1, resample_every=0)
    with pytest.raises(TypeError, match="base_optimizer"):
        GradientViewLoRA([w], rank=1, base_optimizer="adamw")


# -- as a PEFT method ----------------------------------------------------------------------------------------------

def _train_peft(peft_model, steps_batches, **optimizer_options):
    from hf_ext.peft import gradient_view_optimizer

    optimizer = gradient_view_optimizer(peft_model, **optimizer_options)
    for batch in steps_batches:
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.smoke
@pytest.mark.parametrize("mode", ["lora", "fixed_a", "resample"])
def test_peft_method_round_trips_and_each_mode_keeps_its_rank(tmp_path, mode):
    from peft import PeftConfig, PeftModel

    from hf_ext.peft import GradientViewLoraConfig

    config = GradientViewLoraConfig(r=2, lora_alpha=4, mode=mode, resample_every=2, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(tiny_llama(), config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("hfxgv_delta.default" in n for n in trainable)
    batches = token_batches()
    _train_peft(peft_model, batches * 2, lr=1e-2)
    deltas = {n: p.detach() for n, p in peft_model.named_parameters() if "hfxgv_delta" in n}
    ranks = [torch.linalg.matrix_rank(d).item() for d in deltas.values()]
    if mode == "resample":
        assert max(ranks) > 2  # 4 resampling periods of rank 2·r each
    else:
        assert max(ranks) <= 2 and min(ranks) >= 1

    peft_model.eval()
    ids = batches[0]["input_ids"]
    trained = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == "HFX_GRADIENT_VIEW_LORA"
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert isinstance(reloaded.peft_config["default"], GradientViewLoraConfig)
    torch.testing.assert_close(reloaded(ids).logits, trained, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, trained, rtol=0, atol=1e-5)



@pytest.mark.parametrize("mode", ["lora", "fixed_a", "resample"])
def test_peft_method_starts_as_the_base_model_and_trains_only_rank_r_factors(mode):
    from hf_ext.peft import GradientViewLoraConfig, gradient_view_optimizer

    r, model, ids = 2, tiny_llama(), token_batches()[0]["input_ids"]
    expected = model(ids).logits
    config = GradientViewLoraConfig(r=r, lora_alpha=4, mode=mode, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=0)
    optimizer = gradient_view_optimizer(peft_model, lr=1e-3, weight_decay=0.0)
    assert isinstance(optimizer, GradientViewLoRA)
    deltas = [p for group in optimizer.param_groups for p in group["params"]]
    factors = sum(p.numel() for group in optimizer.base.param_groups for p in group["params"])
    per_matrix = [r * m if mode == "fixed_a" else r * (m + n) for m, n in (p.shape for p in deltas)]
    assert len(deltas) == 4 and factors == sum(per_matrix) < sum(p.numel() for p in deltas)

def test_peft_method_in_lora_mode_equals_the_optimizer_on_raw_weights():
    from hf_ext.peft import GradientViewLoraConfig

    batches = token_batches()
    config = GradientViewLoraConfig(r=2, lora_alpha=4, mode="lora", target_modules=["q_proj"])
    peft_model = get_peft_model(tiny_llama(torch.float64), config)
    peft_layers = [layer.self_attn.q_proj for layer in peft_model.base_model.model.model.layers]
    initial_A = [q_proj.hfxgv_lora_A["default"].detach().clone() for q_proj in peft_layers]
    _train_peft(peft_model, batches, lr=1e-2, seed=3)

    model = tiny_llama(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [layer.self_attn.q_proj.weight for layer in model.model.layers]
    for w in weights:
        w.requires_grad_(True)
    optimizer = GradientViewLoRA(weights, rank=2, scaling=2.0, lr=1e-2, seed=3)
    for w, lora_A in zip(weights, initial_A):  # the adapter's A is drawn by the layer, PEFT LoRA's way
        optimizer.state[w]["lora_A"].copy_(lora_A)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for q_proj, trained in zip(peft_layers, model.model.layers):
        torch.testing.assert_close(q_proj.base_layer.weight + q_proj.hfxgv_delta["default"],
                                   trained.self_attn.q_proj.weight, rtol=0, atol=1e-12)


def test_peft_config_refuses_bad_fields():
    from hf_ext.peft import GradientViewLoraConfig

    with pytest.raises(ValueError, match="mode must be one of"):
        GradientViewLoraConfig(mode="galore", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="target_modules is required"):
        GradientViewLoraConfig(r=2)
    with pytest.raises(ValueError, match="r must be a positive int"):
        GradientViewLoraConfig(r=0, target_modules=["q_proj"])


def test_peft_type_answers_value_like_peft_enum_members(tmp_path):
    """PEFT reads config.peft_type.value; asking for a mixed model gets PEFT's own refusal, not an AttributeError."""
    import json

    from hf_ext.peft import GradientViewLoraConfig

    config = GradientViewLoraConfig(r=2, target_modules=["q_proj"])
    assert config.peft_type.value == config.peft_type == "HFX_GRADIENT_VIEW_LORA"
    with pytest.raises(ValueError, match="HFX_GRADIENT_VIEW_LORA.* is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_llama(), config, mixed=True)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HFX_GRADIENT_VIEW_LORA"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merging_into_a_half_precision_base_keeps_its_dtype(dtype):
    from hf_ext.peft import GradientViewLoraConfig

    peft_model = get_peft_model(tiny_llama(dtype=dtype), GradientViewLoraConfig(r=2, target_modules=["q_proj"]))
    deltas = [p for name, p in peft_model.named_parameters() if "hfxgv_delta" in name]
    assert {p.dtype for p in deltas} == {torch.float32}  # PEFT's autocast_adapter_dtype
    with torch.no_grad():
        for delta in deltas:
            delta.normal_(0, 0.01)
    ids = token_batches()[0]["input_ids"]
    expected = peft_model(ids).logits
    peft_model.merge_adapter()
    assert all(module.weight.dtype == dtype for name, module in peft_model.named_modules() if name.endswith("q_proj"))
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=0.1)
    peft_model.unmerge_adapter()
    merged = peft_model.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=0.1)


def test_an_ordinary_optimizer_stepping_the_dense_delta_is_refused(tmp_path):
    """Any optimizer but GradientViewLoRA would train a full-rank ΔW: its first step raises, saying what to use;
    the gradient-view optimizer (and other optimizers over other parameters) step as before."""
    from hf_ext.peft import GradientViewLoraConfig

    peft_model = get_peft_model(tiny_llama(), GradientViewLoraConfig(r=2, target_modules=["q_proj"]))
    batch = token_batches()[0]
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model(**batch).loss.backward()
    plain = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(RuntimeError, match="AdamW is about to step the dense ΔW.*gradient_view_optimizer"):
        plain.step()
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if p.requires_grad)
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no")
    with pytest.raises(RuntimeError, match="about to step the dense ΔW"):
        Trainer(peft_model, args, train_dataset=_TokenDataset(8)).train()
    _train_peft(peft_model, token_batches()[:2], lr=1e-3)  # the gradient-view optimizer steps
    other = torch.nn.Linear(2, 2)
    other(torch.ones(1, 2)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()


def test_conv1d_targets_of_gpt2_train_save_reload_and_merge(tmp_path):
    """GPT-2's projections are transformers' Conv1D (weight [in, out]); "all-linear" selects them."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_ext.peft import GradientViewLoraConfig

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)

    model = gpt2()
    ids = token_batches()[0]["input_ids"]
    expected = model(ids).logits
    peft_model = get_peft_model(model, GradientViewLoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "hfxgv_delta")]
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"c_attn", "c_proj", "c_fc"}
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=0)
    _train_peft(peft_model, token_batches() * 2, lr=1e-2)
    deltas = [p.detach() for n, p in peft_model.named_parameters() if "hfxgv_delta" in n]
    assert max(torch.linalg.matrix_rank(d).item() for d in deltas) <= 2 and any(d.abs().max() > 0 for d in deltas)
    peft_model.eval()
    trained = peft_model(ids).logits
    assert not torch.allclose(trained, expected)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(gpt2(), tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, trained, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.merge_and_unload()(ids).logits, trained, rtol=0, atol=1e-5)


def test_low_cpu_mem_usage_loading_and_the_optimizer_check_survive_peft_rebuilding_parameters(tmp_path):
    """With low_cpu_mem_usage PEFT rebuilds each parameter on the meta device; the adapter still loads exactly and
    an ordinary optimizer is still refused."""
    from peft import PeftModel

    from hf_ext.peft import GradientViewLoraConfig

    config = GradientViewLoraConfig(r=2, target_modules=["q_proj"], init_weights=False)
    trained = get_peft_model(tiny_llama(), config).eval()
    ids = token_batches()[0]["input_ids"]
    expected = trained(ids).logits
    trained.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    torch.testing.assert_close(reloaded.eval()(ids).logits, expected, rtol=0, atol=0)
    fresh = get_peft_model(tiny_llama(), GradientViewLoraConfig(r=2, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    for model in (reloaded, fresh):  # the check runs before the step, gradients or not
        with pytest.raises(RuntimeError, match="about to step the dense ΔW"):
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()


def test_init_weights_false_starts_from_a_small_random_delta():
    from hf_ext.peft import GradientViewLoraConfig

    model, ids = tiny_llama(), token_batches()[0]["input_ids"]
    expected = model(ids).logits
    peft_model = get_peft_model(model, GradientViewLoraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    deltas = [p for n, p in peft_model.named_parameters() if "hfxgv_delta" in n]
    assert all(0 < d.abs().max() < 0.2 for d in deltas)
    assert not torch.allclose(peft_model(ids).logits, expected)
    with pytest.raises(ValueError, match="init_weights must be True or False"):
        GradientViewLoraConfig(r=2, target_modules=["q_proj"], init_weights="gaussian")


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["lora", "fixed_a"])
def test_factor_modes_save_rank_r_factors_the_size_of_a_lora_adapter_and_reload_bit_for_bit(tmp_path, mode):
    from peft import PeftModel

    from hf_ext.peft import GradientViewLoraConfig

    r, targets = 2, ["q_proj", "v_proj"]
    peft_model = get_peft_model(tiny_llama(), GradientViewLoraConfig(r=r, lora_alpha=4, mode=mode,
                                                                     target_modules=targets))
    _train_peft(peft_model, token_batches() * 2, lr=1e-2)
    deltas = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "hfxgv_delta" in n}
    assert all(d.abs().max() > 0 for d in deltas.values())
    peft_model.save_pretrained(tmp_path / "gv")
    saved = _adapter_tensors(tmp_path / "gv")
    assert saved and all(".hfxgv_lora_A" in k or ".hfxgv_lora_B" in k for k in saved)
    assert len(saved) == 2 * len(deltas)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=4, target_modules=targets))
    lora.save_pretrained(tmp_path / "lora")
    lora_sizes = sorted(t.shape for t in _adapter_tensors(tmp_path / "lora").values())
    assert sorted(t.shape for t in saved.values()) == lora_sizes  # Linear targets: B [out, r], A [r, in] as LoRA's

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "gv")
    for name, p in reloaded.named_parameters():
        if "hfxgv_delta" in name:
            assert torch.equal(p, deltas[name])  # ΔW recomputed from the factors is the trained ΔW, bit for bit
    for module in reloaded.modules():
        if hasattr(module, "hfxgv_delta"):
            base = module.base_layer.weight.detach().clone()
            module.merge()
            assert torch.equal(module.base_layer.weight, base + module.hfxgv_delta["default"])


def test_resample_mode_saves_the_dense_delta(tmp_path):
    from hf_ext.peft import GradientViewLoraConfig

    peft_model = get_peft_model(tiny_llama(), GradientViewLoraConfig(r=2, mode="resample", resample_every=1,
                                                                     target_modules=["q_proj"]))
    _train_peft(peft_model, token_batches() * 2, lr=1e-2)
    peft_model.save_pretrained(tmp_path)
    saved = _adapter_tensors(tmp_path)
    assert saved and all(k.endswith(".hfxgv_delta") for k in saved)
    assert all(torch.linalg.matrix_rank(t).item() > 2 for t in saved.values())


def test_resuming_from_the_adapter_and_optimizer_state_continues_bit_for_bit(tmp_path):
    """The optimizer's state holds copies of the factors; loading it writes them back into the model's tensors."""
    from peft import PeftModel

    from hf_ext.peft import GradientViewLoraConfig, gradient_view_optimizer

    config = GradientViewLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    batches = token_batches()

    def train(model, optimizer, steps):
        for batch in steps:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), config)
    optimizer = gradient_view_optimizer(peft_model, lr=1e-2)
    train(peft_model, optimizer, batches[:2])
    peft_model.save_pretrained(tmp_path)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    train(peft_model, optimizer, batches[2:])

    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    resumed_optimizer = gradient_view_optimizer(resumed, lr=1e-2)
    resumed_optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    train(resumed, resumed_optimizer, batches[2:])
    expected = dict(peft_model.named_parameters())
    for name, p in resumed.named_parameters():
        if "hfxgv_" in name:
            assert torch.equal(p, expected[name]), name


def test_an_optimizer_whose_settings_differ_from_the_adapter_is_refused():
    from hf_ext.peft import GradientViewLoraConfig

    peft_model = get_peft_model(tiny_llama(), GradientViewLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    deltas = [p for n, p in peft_model.named_parameters() if "hfxgv_delta" in n]
    with pytest.raises(ValueError, match=r"rank=4.*made with mode='lora', r=2, scaling=2.0.*gradient_view_optimizer"):
        GradientViewLoRA(deltas, rank=4, scaling=2.0, lr=1e-3)
    with pytest.raises(ValueError, match="mode='fixed_a'"):
        GradientViewLoRA(deltas, rank=2, mode="fixed_a", scaling=2.0, lr=1e-3)
    optimizer = GradientViewLoRA(deltas, rank=2, scaling=2.0, lr=1e-3)  # the adapter's own settings: its factors
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert optimizer.state[deltas[0]]["lora_B"] is layer.hfxgv_lora_B["default"]


def test_a_dense_delta_file_for_a_factor_mode_is_refused_with_the_way_to_load_it(tmp_path):
    """An adapter written before factors were saved: refused, unchanged, and loadable as mode 'resample'."""
    import json

    from peft import PeftModel
    from safetensors.torch import save_file

    from hf_ext.peft import GradientViewLoraConfig

    peft_model = get_peft_model(tiny_llama(), GradientViewLoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    dense = {n.replace(".default", ""): torch.full_like(p, 0.01)
             for n, p in peft_model.named_parameters() if "hfxgv_delta" in n}
    save_file(dense, str(tmp_path / "adapter_model.safetensors"))
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="dense ΔW but no rank-2 factors.*\"mode\": \"resample\""):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "mode": "resample"}))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert all(torch.equal(p, torch.full_like(p, 0.01)) for n, p in reloaded.named_parameters() if "hfxgv_delta" in n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_follow_the_adapter_dtype_and_stay_out_of_the_trainable_parameters(dtype):
    from hf_ext.peft import GradientViewLoraConfig, gradient_view_optimizer

    peft_model = get_peft_model(tiny_llama(dtype=dtype), GradientViewLoraConfig(r=2, target_modules=["q_proj"]))
    factors = [p for n, p in peft_model.named_parameters() if "hfxgv_lora_" in n]
    assert factors and {p.dtype for p in factors} == {torch.float32}  # PEFT's autocast_adapter_dtype
    assert not any(p.requires_grad for p in factors)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("hfxgv_delta" in n for n in trainable)
    optimizer = gradient_view_optimizer(peft_model, lr=1e-3)
    assert len(optimizer.param_groups) == 1  # no factor slipped in as a "module to save"


def test_an_unknown_target_layer_type_is_refused_in_peft_wording():
    """PEFT's own message for a layer type a method cannot adapt, which PEFT's suite (0.22) matches."""
    from hf_ext.peft import GradientViewLoraConfig

    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 4))

    model = torch.nn.Sequential()
    model.add_module("lin0", Unknown())
    with pytest.raises(TypeError, match=r"Target module Unknown is not supported: gradient-view LoRA adapts "
                                        r"torch\.nn\.Linear and transformers' Conv1D layers"):
        get_peft_model(model, GradientViewLoraConfig(r=2, target_modules=["lin0"]))
