"""Lion and the tail-capped loss inside transformers' Trainer: exact gradient accumulation and exact resume."""

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_ext
from hf_ext.losses import TailCappedLoss
from hf_ext.optim import lion_optimizer_cls_and_kwargs

from conftest import tiny_config
from training_data import RaggedLabelRows


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                    learning_rate=1.0, lr_scheduler_type="constant", seed=0, dataloader_num_workers=0,
                    disable_tqdm=True)
    settings.update(overrides)
    return TrainingArguments(**settings)


def _sgd_update(tmp_path, model, batch_size, accumulation, **trainer_kwargs):
    """Parameter change after one optimizer step of plain SGD (lr 1): exactly minus the accumulated gradient."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    args = _args(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                 max_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    Trainer(model, args, train_dataset=RaggedLabelRows(4), optimizers=(optimizer, None), **trainer_kwargs).train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.smoke
@pytest.mark.parametrize("plumbing", ["compute_loss_func", "model.loss_function", "fused", "fused llama"])
def test_gradient_accumulation_is_exact(tmp_path, plumbing):
    model = (_tiny_llama() if plumbing == "fused llama" else hf_ext.HfExtForCausalLM(tiny_config())).double()
    loss = TailCappedLoss(gamma=0.3, min_weight=0.1, fused=plumbing.startswith("fused"), chunk_size=8)
    trainer_kwargs = {}
    if plumbing == "compute_loss_func":
        trainer_kwargs["compute_loss_func"] = loss
    else:
        hf_ext.losses.enable_fused_loss(model, loss) if loss.fused else setattr(model, "loss_function", loss)
    updates = [_sgd_update(tmp_path, model, b, 4 // b, **trainer_kwargs) for b in (4, 2, 1)]
    # float64 reference: the mean over all valid target tokens of the four rows, computed directly
    reference_model = hf_ext.losses.disable_fused_loss(copy.deepcopy(model))
    reference_model.loss_function = TailCappedLoss(gamma=0.3, min_weight=0.1)
    ids, labels = RaggedLabelRows(4).stacked()
    reference_model(ids, labels=labels).loss.backward()
    expected = -torch.cat([p.grad.flatten() for p in reference_model.parameters()])
    for update in updates:
        assert ((update - expected).norm() / expected.norm()).item() < 1e-10


def _lion_run(tmp_path, max_steps, resume_from=None, save_steps=None):
    # bf16 weights with fp32 Lion state: the resumed momentum must stay fp32 (torch's base class would cast it)
    model = hf_ext.HfExtForCausalLM(tiny_config()).to(torch.bfloat16)
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=max_steps, learning_rate=3e-3,
                 lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1,
                 save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    trainer = Trainer(model, args, train_dataset=RaggedLabelRows(24),
                      optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args, state_dtype=torch.float32),
                      compute_loss_func=TailCappedLoss(gamma=0.1))
    trainer.train(resume_from_checkpoint=resume_from)
    return model


@pytest.mark.smoke
def test_trainer_resume_from_checkpoint_is_bit_identical(tmp_path):
    uninterrupted = _lion_run(tmp_path / "a", max_steps=8, save_steps=4)
    resumed = _lion_run(tmp_path / "b", max_steps=8, resume_from=str(tmp_path / "a" / "checkpoint-4"))
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    fresh = hf_ext.HfExtForCausalLM(tiny_config()).to(torch.bfloat16)
    moved = any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), resumed.parameters()))
    assert moved
