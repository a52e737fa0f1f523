"""LoRA-GA with bitsandbytes bases, under Trainer (one line, exact resume) and under 2-process DDP."""


import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

from hf_ext.peft import get_lora_ga_model
from hf_ext.peft.gradient_sketch import default_loss, gradient_singular_vectors
from test_lora_ga import VOCAB, tiny_llama, token_batches
from torchrun import torchrun


def quantized_tiny_llama(tmp_path, bits: int):
    tiny_llama(hidden=64, intermediate=128).save_pretrained(tmp_path / "float")
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config, device_map="cpu")


def dequantized_copy(quantized, tmp_path):
    """A float model with the quantized model's dequantized weights (the same linear maps, in fp32)."""
    from peft.utils.integrations import dequantize_module_weight

    float_model = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    float_modules = dict(float_model.named_modules())
    for name, module in quantized.named_modules():
        if type(module).__module__.startswith("bitsandbytes"):  # the 4-bit layers, wrapped by PEFT or not
            name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            float_modules[name].weight.data = dequantize_module_weight(module).float()
    return float_model


@pytest.mark.smoke
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_gets_lora_ga_from_activations_and_output_gradients(tmp_path, bits):
    model = quantized_tiny_llama(tmp_path, bits)
    batches = token_batches()
    with torch.no_grad():
        model(batches[0]["input_ids"])  # an inference call first: 4-bit CPU weights get repacked (see _estimation_mode)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    # 4 power iterations, as the float reference below: the comparison is of the quantized path, not of iterations
    peft_model = get_lora_ga_model(model, config, batches, power_iterations=4, show_progress=False)
    layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == 4 and all(type(m.base_layer).__module__.startswith("bitsandbytes") for m in layers.values())

    # the offset cancels the adapter layer by layer (logits of a random 4-bit model amplify bnb's own rounding)
    for layer in layers.values():
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)

    # the gradient subspace matches the one of a float model with the same (dequantized) weights
    if bits == 4:
        float_model = dequantized_copy(model, tmp_path)
        modules = dict(float_model.named_modules())
        names = [n.removeprefix("base_model.model.") for n in layers]
        vectors = gradient_singular_vectors(float_model.eval(), {n: modules[n] for n in names}, batches,
                                            default_loss, q={n: 8 for n in names}, show_progress=False)
        for name, layer in zip(names, layers.values()):
            ours = layer.lora_A["default"].trainable
            ours = ours / ours.norm(dim=1, keepdim=True)
            reference = vectors[name][2][:, :2].T  # A = top-r right singular vectors
            cosines = (ours @ reference.T).abs().diagonal()
            assert cosines.min() > 0.98, (name, cosines)

    # it trains, and the saved adapter loads onto a fresh quantized base
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches * 3:
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = quantized_tiny_llama(tmp_path, bits)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    for name, module in reloaded.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            trained = layers["base_model.model." + name.removeprefix("base_model.model.")]
            x = torch.randn(3, module.in_features)
            torch.testing.assert_close(module(x) - module.base_layer(x), trained(x) - trained.base_layer(x),
                                       rtol=0, atol=1e-5)


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: int, length: int = 12):
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (rows, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _trainer(model, output_dir, max_steps, save_steps=None):
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500, logging_strategy="no", use_cpu=True, seed=0,
                             data_seed=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=_TokenDataset(16))


def test_trainer_one_liner_and_bit_identical_resume(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = _TokenDataset(16)

    def lora_ga_model():  # the one line a Trainer script adds
        return get_lora_ga_model(tiny_llama(), config, torch.utils.data.DataLoader(dataset, batch_size=2),
                                 num_gradient_batches=4, show_progress=False)

    uninterrupted = lora_ga_model()
    _trainer(uninterrupted, tmp_path / "run", max_steps=6, save_steps=3).train()
    resumed = lora_ga_model()
    _trainer(resumed, tmp_path / "resumed", max_steps=6).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for (name, expected), (_, actual) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(expected, actual), name
    moved = [not torch.equal(a, b) for (n, a), (_, b) in zip(uninterrupted.state_dict().items(),
                                                              lora_ga_model().state_dict().items()) if "lora_" in n]
    assert any(moved)


def test_ddp_gradients_are_averaged_across_ranks_before_the_svd(tmp_path):
    result = torchrun("lora_ga_ranks.py", "lora_ga", tmp_path)
    assert result["ranks_identical"]
    assert result["max_diff_vs_single_process"] < 1e-10
