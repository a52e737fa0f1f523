"""The data and runs of training_quality (benchmarks/tasks/text_training.py): noisy labels, the list of trainings,
the held-out statistics and the Python-documentation blocks."""

import pytest
import torch
from datasets import Dataset

import hf_ext
from benchmarks.tasks.assets import python_doc_files
from benchmarks.tasks.text_training import load_data, mean_loss, noisy_labels, run_specs, tailr_name, token_statistics
from conftest import tiny_config


def test_noisy_labels_replaces_the_fraction_and_never_ignored_positions():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(3, 1000, (64, 128), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.3
    labels[ignored] = -100
    original = labels.clone()
    noisy, replaced = noisy_labels(labels, 0.15, 1000, torch.Generator().manual_seed(1))

    assert torch.equal(labels, original)  # the input is not modified
    assert torch.equal(noisy[ignored], labels[ignored]) and (noisy[ignored] == -100).all()
    assert not replaced[ignored].any()
    valid = ~ignored
    changed = (noisy != labels) & valid
    assert abs(replaced[valid].float().mean().item() - 0.15) < 0.01
    assert abs(changed[valid].float().mean().item() - 0.15) < 0.01
    assert torch.equal(changed, changed & replaced)  # only replaced positions change
    assert ((noisy[valid] >= 3) & (noisy[valid] < 1000))[replaced[valid]].all()
    # the same generator seed gives the same noise; fraction 0 changes nothing
    again, _ = noisy_labels(labels, 0.15, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    untouched, none = noisy_labels(labels, 0.0, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(untouched, labels) and not none.any()
    with pytest.raises(ValueError):
        noisy_labels(labels, 1.5, 1000, generator)


def test_run_specs_pair_every_candidate_with_its_reference():
    settings = {"seed": 0, "label_noise": 0.15, "lion_factors": (1.0, 3.0, 10.0), "spread_seeds": (1,),
                "tailr": ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1e-7, 0.2)), "clean_skip": ((0.5, 0.0),)}
    specs = run_specs(settings)
    names = [spec.name for spec in specs]
    assert names[0] == "AdamW, CE, clean" and len(set(names)) == len(names)
    for factor in ("1", "3", "10"):
        assert f"Lion ×{factor}, CE, clean" in names
    assert "AdamW, CE, 15% noisy labels" in names and "AdamW, CE, clean, seed 1" in names
    for gamma, min_weight in settings["tailr"]:
        loss = tailr_name(gamma, min_weight)
        assert f"AdamW, {loss}, 15% noisy labels" in names
        assert (f"AdamW, {loss}, clean" in names) == ((gamma, min_weight) not in settings["clean_skip"])
    noisy = [spec for spec in specs if spec.label_noise]
    assert all(spec.label_noise == 0.15 and spec.optimizer == "adamw" for spec in noisy)
    assert {spec.min_weight for spec in specs if spec.gamma is not None} == {0.0, 0.2}


def test_token_statistics_mean_is_the_mean_loss():
    torch.manual_seed(0)
    model = hf_ext.HfExtForCausalLM(tiny_config())
    blocks = Dataset.from_dict({"input_ids": torch.randint(3, 97, (7, 16)).tolist()})
    statistics = token_statistics(model, blocks, batch_size=3)
    assert statistics["loss"] == pytest.approx(mean_loss(model, blocks, batch_size=3), abs=1e-5)
    assert 0 <= statistics["accuracy"] <= 100 and statistics["median_token_loss"] > 0


def test_load_data_cuts_held_out_blocks_of_the_python_docs():
    try:
        python_doc_files(1)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    data = load_data({"vocab_size": 512, "block_size": 64, "max_characters": 60_000, "eval_blocks": 8, "seed": 0})
    assert data.train_input_ids.shape == (data.report["data"]["train_blocks"], 64)
    assert len(data.eval_blocks) == data.report["data"]["eval_blocks"] == 8
    assert data.report["tokenizer"]["vocab_size"] <= 512 and len(data.tokenizer) <= 512
    assert [data.tokenizer.pad_token_id, data.tokenizer.bos_token_id, data.tokenizer.eos_token_id] == [0, 1, 2]
    assert int(data.train_input_ids.max()) < len(data.tokenizer)
    # the paragraphs are separated by </s>
    assert (data.train_input_ids == data.tokenizer.eos_token_id).any()
