"""TRL's SFTTrainer with hf_ext: the tail-capped loss as asked (fused through TRL's chunked head, or on full logits),
a clear refusal where it would silently not apply, Lion, and a LoRA-GA-initialised model."""

import copy

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from hf_ext import HfExtForCausalLM
from hf_ext.losses import TailCappedLoss
from hf_ext.optim import Lion, lion_optimizer_cls_and_kwargs
from hf_ext.peft.lora_ga import get_lora_ga_model

trl = pytest.importorskip("trl")  # TRL needs Python 3.11; the oldest-versions lane runs 3.10
from datasets import Dataset  # noqa: E402  (a TRL dependency)
from hf_ext.trl import TailCappedSFTTrainer  # noqa: E402

VOCAB = 97


def _tokenizer() -> PreTrainedTokenizerFast:
    vocabulary = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t2", bos_token="t1",
                                   unk_token="t3")


def _dataset(rows=16, length=12, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                    logging_steps=1, save_strategy="no", report_to=[], max_length=16, seed=0, use_cpu=True,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def _model(seed=0) -> HfExtForCausalLM:
    torch.manual_seed(seed)
    return HfExtForCausalLM(tiny_config(eos_token_id=2))


def _first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _reference_loss(model, batch, loss: TailCappedLoss) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return TailCappedLoss(loss.gamma, loss.min_weight)(logits, batch["labels"])


@pytest.mark.parametrize("gamma, min_weight", [(0.1, 0.0), (1e-7, 0.2), (0.5, 0.3)])
def test_tail_capped_sft_trainer_trains_the_tail_capped_loss_without_full_logits(tmp_path, gamma, min_weight):
    loss = TailCappedLoss(gamma=gamma, min_weight=min_weight)
    model = _model().train()
    trainer = TailCappedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                                   processing_class=_tokenizer(), tail_capped_loss=loss)
    batch = _first_batch(trainer)
    ours = trainer.compute_loss(model, dict(batch))
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = _reference_loss(model, batch, loss)
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(ours_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # and it is not SFTTrainer's plain cross-entropy (γ = 1e-7 weights nearly every token by 1: there it nearly is)
    plain = trl.SFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                           processing_class=_tokenizer())
    assert abs(plain.compute_loss(model, dict(batch)).item() - ours.item()) > (1e-3 if gamma >= 0.1 else 0)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)


def test_unfused_tail_capped_loss_as_compute_loss_func_is_used_by_sft_trainer(tmp_path):
    loss = TailCappedLoss(gamma=0.1)
    model = _model().train()
    trainer = trl.SFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                             processing_class=_tokenizer(), compute_loss_func=loss)
    batch = _first_batch(trainer)
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), _reference_loss(model, batch, loss),
                               rtol=1e-5, atol=1e-6)


def test_fused_loss_where_nothing_can_be_fused_is_refused_with_what_works(tmp_path):
    model = _model().train()
    trainer = trl.SFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                             processing_class=_tokenizer(), compute_loss_func=TailCappedLoss(gamma=0.1, fused=True))
    with pytest.raises(ValueError, match="TailCappedLoss\\(fused=True\\) was given the model's output with full "
                                         "logits.*TailCappedSFTTrainer"):
        trainer.compute_loss(model, dict(_first_batch(trainer)))
    for bad, message in [(dict(tail_capped_loss=TailCappedLoss(0.1, label_smoothing=0.1)), "label_smoothing must be 0"),
                         (dict(tail_capped_loss=TailCappedLoss(0.1, ignore_index=-1)), "ignore_index must be -100"),
                         (dict(tail_capped_loss=TailCappedLoss(0.1), compute_loss_func=TailCappedLoss(0.1)),
                          "leave compute_loss_func unset"),
                         (dict(tail_capped_loss="ce"), "must be a TailCappedLoss")]:
        with pytest.raises(ValueError, match=message):
            TailCappedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                                 processing_class=_tokenizer(), **bad)
    with pytest.raises(ValueError, match="loss_type must be 'nll'"):
        TailCappedSFTTrainer(model=model, args=_config(tmp_path, loss_type="dft"), train_dataset=_dataset(),
                             processing_class=_tokenizer(), tail_capped_loss=TailCappedLoss(0.1))


def test_sft_trainer_with_lion(tmp_path):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    args = _config(tmp_path)
    trainer = TailCappedSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer(),
                                   optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args),
                                   tail_capped_loss=TailCappedLoss(gamma=1e-7, min_weight=0.2))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      Lion)
    # Lion moves every weight with a gradient by exactly ±lr per step (before weight decay): 3 steps, lr 1e-3
    change = (model.model.embed_tokens.weight - before["model.embed_tokens.weight"]).abs().max().item()
    assert 0 < change <= 3 * args.learning_rate * (1 + 1e-3)


def test_lora_ga_initialised_model_trains_under_sft_trainer(tmp_path):
    base = _model()
    trainer_for_data = trl.SFTTrainer(model=copy.deepcopy(base), args=_config(tmp_path), train_dataset=_dataset(),
                                      processing_class=_tokenizer())
    batches = [trainer_for_data._prepare_inputs(batch) for batch in trainer_for_data.get_train_dataloader()]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_lora_ga_model(base, config, batches, num_gradient_batches=2, show_progress=False)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = TailCappedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                                   processing_class=_tokenizer(), tail_capped_loss=TailCappedLoss(gamma=0.1))
    trainer.train()
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in frozen.items())
    assert any(not torch.equal(parameters[name], value) for name, value in adapters.items())


def test_a_loss_computed_without_the_fused_head_is_refused(tmp_path, monkeypatch):
    """Should SFTTrainer compute its loss some other way (another TRL release, another code path), the trainer
    says so instead of returning plain cross-entropy under the tail-capped name."""
    model = _model().train()
    trainer = TailCappedSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                                   processing_class=_tokenizer(), tail_capped_loss=TailCappedLoss(gamma=0.1))
    batch = _first_batch(trainer)
    monkeypatch.setattr(trl.SFTTrainer, "compute_loss",
                        lambda self, model, inputs, **kwargs: model(**inputs).loss)  # the model's own loss
    with pytest.raises(RuntimeError, match="without its fused LM head"):
        trainer.compute_loss(model, dict(batch))
