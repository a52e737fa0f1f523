"""RoPE-Tie in the HfExt family: multi-axis rotary, the image path, stateless generation, parity with Qwen2-VL."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import merged_qwen2_vl_tables
from transformers import AutoModelForCausalLM, AutoProcessor

import hf_ext
from hf_ext import HfExtConfig, HfExtForCausalLM
from benchmarks.tasks.digit_canvas import build_processor

LAYOUTS = ["flatten", "mrope", "rope_tie_v1", "rope_tie_v2"]


def _tiny_config(layout, processor=None, **overrides):
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, position_layout=layout, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    if processor is not None:
        fields.update(processor.model_config_kwargs)
    else:
        fields["vocab_size"] = 64
    fields.update(overrides)
    return HfExtConfig(**fields)


def _image_model(layout, patch_size=2, seed=0):
    processor = build_processor(patch_size=patch_size)
    torch.manual_seed(seed)
    return HfExtForCausalLM(_tiny_config(layout, processor)).eval(), processor


def _mixed_batch(processor, seed=0):
    """Three rows, left-padded: images of different sizes, two images in one row, text before and after."""
    generator = torch.Generator().manual_seed(seed)
    p = processor.patch_size
    images = [[torch.rand(2 * p, 3 * p, generator=generator)],
              [torch.rand(p, 2 * p, generator=generator), torch.rand(3 * p, p, generator=generator)],
              [torch.rand(3 * p, 3 * p, generator=generator)]]
    texts = ["what is <image> at row 1 col 2 ?", "<image> left of <image> how many 3 ?", "<image> above 7 ?"]
    return processor(text=texts, images=images)


def _rows(batch, indices):
    return {key: value[indices] for key, value in batch.items()}


@pytest.mark.parametrize("layout", ["mrope", "rope_tie_v1", "rope_tie_v2"])
def test_text_only_rope_tie_equals_plain_rope(layout):
    torch.manual_seed(0)
    plain = HfExtForCausalLM(_tiny_config("flatten")).eval()
    tied = HfExtForCausalLM(_tiny_config(layout)).eval()
    tied.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 64, (2, 11))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    positions = tied.model.get_position_ids(ids, None, attention_mask)
    assert positions.shape == (tied.config.position_axes, 2, 11)
    assert torch.equal(positions[0], positions[-1])  # text: every axis equal
    expected = plain(ids, attention_mask=attention_mask, position_ids=positions[0]).logits
    # multi-axis tables with equal axes are the RoPE-1D tables, bit for bit
    assert torch.equal(tied(ids, attention_mask=attention_mask, position_ids=positions).logits, expected)
    assert torch.equal(tied(ids, attention_mask=attention_mask).logits, expected)
    generate = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(tied.generate(**generate), plain.generate(**generate))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_are_invariant_to_shifting_every_position(layout):
    model, processor = _image_model(layout)
    batch = _mixed_batch(processor)
    positions = model.model.get_position_ids(batch["input_ids"], batch["image_grid_hw"], batch["attention_mask"])
    reference = model(**batch).logits
    torch.testing.assert_close(model(**batch, position_ids=positions).logits, reference, rtol=0, atol=0)
    for shift in (7.0, 12.5):
        shifted = model(**batch, position_ids=positions + shift).logits
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(shifted[keep], reference[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.smoke
@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_after_images_equals_a_full_forward_and_uses_the_same_positions(layout):
    model, processor = _image_model(layout)
    batch = _mixed_batch(processor)
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["position_ids"]), with_kwargs=True)
    # an untrained model may emit image markers, which a full forward would rightly refuse as unpaired
    markers = [processor.model_config_kwargs[key] for key in ("image_token_id", "image_start_token_id",
                                                              "image_end_token_id")]
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         suppress_tokens=markers)
    hook.remove()
    prompt_length = batch["input_ids"].shape[1]
    attention_mask = torch.cat([batch["attention_mask"], torch.ones(3, 5, dtype=torch.long)], dim=1)
    full_batch = dict(batch, input_ids=out.sequences, attention_mask=attention_mask)
    full = model(**full_batch).logits
    scores = torch.stack(out.scores, dim=1)
    full[..., markers] = float("-inf")
    torch.testing.assert_close(scores, full[:, prompt_length - 1 : -1], rtol=1e-5, atol=1e-5)
    # the positions of the prompt and of each decoded token are the columns of the full sequence's positions
    stepwise = torch.cat(seen, dim=-1)  # the prompt, then one column per decoding step (the last token is not fed)
    assert len(seen) == 5 and stepwise.shape[-1] == out.sequences.shape[1] - 1
    full_positions = model.model.get_position_ids(out.sequences, batch["image_grid_hw"], attention_mask)[..., :-1]
    keep = attention_mask[:, :-1].bool()
    assert torch.equal(stepwise[:, keep], full_positions[:, keep])


@pytest.mark.parametrize("layout", ["mrope", "rope_tie_v2"])
def test_rows_of_a_mixed_batch_decode_as_they_would_alone(layout):
    model, processor = _image_model(layout)
    generator = torch.Generator().manual_seed(1)
    texts = ["<image> what is at row 1 col 2 ?", "how many <image> 4 ?", "<image> <image> left of 3 ?"]
    images = [[torch.rand(4, 6, generator=generator)], [torch.rand(2, 2, generator=generator)],
              [torch.rand(6, 2, generator=generator), torch.rand(2, 4, generator=generator)]]
    together = model.generate(**processor(text=texts, images=images), max_new_tokens=4, do_sample=False)
    for row in range(3):
        alone = model.generate(**processor(text=[texts[row]], images=[images[row]]), max_new_tokens=4, do_sample=False)
        assert torch.equal(together[row, -4:], alone[0, -4:])


@pytest.mark.smoke
def test_generation_batch_may_differ_from_the_training_batch():
    """transformers#44873's failure: M-RoPE state from a training batch of one size breaks a generate of another."""
    model, processor = _image_model("mrope")
    big = _mixed_batch(processor)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    loss = model(**big, labels=big["input_ids"].masked_fill(big["attention_mask"] == 0, -100)).loss
    loss.backward()
    optimizer.step()
    model.eval()
    assert model.model.patch_embed.proj.weight.grad.abs().sum() > 0  # the pixels train the patch embedding
    small = _rows(big, [2])
    first = model.generate(**small, max_new_tokens=3, do_sample=False)
    model.generate(**big, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(**small, max_new_tokens=3, do_sample=False), first)
    # beam search and several returned sequences expand the per-row image tensors with the rows
    beams = model.generate(**_rows(big, [0, 2]), max_new_tokens=3, do_sample=False, num_beams=2,
                           num_return_sequences=2)
    assert beams.shape[0] == 4


@pytest.mark.smoke
def test_rotary_tables_and_attention_equal_qwen2_vl_with_the_mrope_layout():
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    qwen_config = Qwen2VLTextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]})
    qwen_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    qwen = Qwen2VLTextModel(qwen_config).eval()
    ours = hf_ext.HfExtModel(HfExtConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                         attention_output_bias=False, position_layout="mrope",
                                         mrope_section=[2, 3, 3], rms_norm_eps=1e-6)).eval()
    missing, unexpected = ours.load_state_dict(qwen.state_dict(), strict=False)
    assert not missing and not unexpected
    is_patch = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]]).bool()
    ids = torch.where(is_patch, 5, 9)
    positions = hf_ext.models.hfext.positions_hfext.build_position_ids(is_patch, [[(2, 3)], [(1, 3), (2, 1)]],
                                                                       "mrope").float()
    embeds = torch.randn(2, 11, 64)
    cos, sin = ours.rotary_emb(embeds, positions)
    qwen_cos, qwen_sin = merged_qwen2_vl_tables(*qwen.rotary_emb(embeds, positions), [2, 3, 3])
    assert torch.equal(cos, qwen_cos) and torch.equal(sin, qwen_sin)
    expected = qwen(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    torch.testing.assert_close(ours(inputs_embeds=embeds, position_ids=positions).last_hidden_state, expected,
                               rtol=1e-5, atol=1e-5)
    assert ids.shape == (2, 11)


@pytest.mark.smoke
def test_save_load_auto_classes_and_trust_remote_code(tmp_path):
    model, processor = _image_model("rope_tie_v2")
    batch = _mixed_batch(processor)
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "processing_hfext.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "checkpoint")
    assert type(reloaded_processor) is hf_ext.HfExtProcessor and reloaded_processor.patch_size == 2
    again = reloaded_processor(text=["what is <image> at row 1 col 2 ?"], images=[[torch.zeros(4, 6)]])
    assert again["image_grid_hw"].tolist() == [[[2, 3]]]
    assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    torch.save(dict(batch), tmp_path / "batch.pt")
    torch.save(model(**batch).logits.detach(), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_ext"] = None  # any `import hf_ext` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        path = {str(tmp_path / "checkpoint")!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        print("max_diff", (model(**batch).logits - expected).abs().max().item())
        fresh = processor(text=["<image> how many 3 ?"], images=[[torch.zeros(2, 4)]])
        print("generate", model.generate(**fresh, max_new_tokens=2, do_sample=False).shape[1])
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("max_diff", "generate")))
    assert float(lines["max_diff"]) == 0.0
    assert lines["generate"] == str(1 + 2 + 1 + 4 + 2)  # start, 1×2 patches, end, "how many 3 ?", 2 new


def test_push_to_hub_card_names_the_layout_and_the_image_patches(tmp_path):
    from fake_hub import FakeHub

    model, _ = _image_model("rope_tie_v2")
    with FakeHub(tmp_path / "hub") as hub:
        model.push_to_hub("me/tiny-vlm")
    card = (hub.repo_dir("me/tiny-vlm") / "README.md").read_text()
    assert "| rotary position layout | `rope_tie_v2` |" in card
    assert "| images | 2×2-pixel patches, 1 channel(s)" in card


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _with_ids(batch, ids):
    return dict(batch, input_ids=ids)


def test_unpaired_markers_and_stray_patch_tokens_are_named():
    model, processor = _image_model("rope_tie_v2")
    batch = processor(text=["a <image> b"], images=[[torch.zeros(2, 4)]])
    ids = batch["input_ids"]
    start, patch, end = (processor.model_config_kwargs[k] for k in ("image_start_token_id", "image_token_id",
                                                                      "image_end_token_id"))
    start_at = int((ids[0] == start).nonzero()[0])
    no_end = ids.clone()
    no_end[0, start_at + 3] = 20
    with pytest.raises(ValueError, match="is not closed|has no image-end"):
        model(**_with_ids(batch, no_end))
    no_start = ids.clone()
    no_start[0, start_at] = 20
    with pytest.raises(ValueError, match="outside an image"):
        model(**_with_ids(batch, no_start))
    empty = torch.tensor([[20, start, end, 21]])
    with pytest.raises(ValueError, match="without patch tokens"):
        model.model.get_position_ids(empty)
    lone_end = torch.tensor([[20, end, 21]])
    with pytest.raises(ValueError, match="no open image"):
        model.model.get_position_ids(lone_end)
    assert patch != start


def test_grids_that_do_not_match_the_patch_tokens_are_named():
    model, processor = _image_model("mrope")
    batch = processor(text=["a <image> b"], images=[[torch.zeros(2, 4)]])
    with pytest.raises(ValueError, match="height × width must equal"):
        model(**dict(batch, image_grid_hw=torch.tensor([[[1, 3]]])))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"], image_grid_hw=batch["image_grid_hw"])
    with pytest.raises(ValueError, match="image_grid_hw must be"):
        model.model.get_position_ids(batch["input_ids"], torch.tensor([[1, 2]]))


def test_continuing_a_cache_of_an_image_model_without_positions_is_refused():
    model, processor = _image_model("rope_tie_v1")
    batch = processor(text=["a <image> b"], images=[[torch.zeros(2, 4)]])
    past = model(**batch, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="position_ids are required"):
        model(input_ids=torch.tensor([[20]]), past_key_values=past)


@pytest.mark.parametrize("overrides, message", [
    ({"position_layout": "rope_tie_v3"}, "`position_layout` is 'rope_tie_v3'; allowed values"),
    ({"position_layout": "mrope", "mrope_section": [2, 2, 2]}, "summing to head_dim // 2 = 4"),
    ({"position_layout": "rope_tie_v2", "attention_types": ["mla", "gqa"], "kv_lora_rank": 8}, "not supported with"),
    ({"position_layout": "rope_tie_v2", "logn_scaling": True}, "not supported with logn_scaling"),
    ({"image_patch_size": 4}, "`image_token_id` must be a token id"),
    ({"image_patch_size": 4, "image_token_id": 3, "image_start_token_id": 3, "image_end_token_id": 4},
     "three different tokens"),
    ({"image_patch_size": 0}, "`image_patch_size` must be a positive integer"),
])
def test_bad_config_fields_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _tiny_config(overrides.pop("position_layout", "flatten"), hidden_size=32, head_dim=8, **overrides)


def test_default_mrope_section_follows_qwen2_vl_proportions():
    assert _tiny_config("mrope", hidden_size=512, num_attention_heads=4).mrope_section == [16, 24, 24]
    assert _tiny_config("mrope", head_dim=16).mrope_section == [2, 3, 3]


def test_readme_snippet_runs_and_prints_what_it_claims(tmp_path, monkeypatch, capsys):
    import re

    from readme_snippets import readme_snippet, run_readme_snippet

    heading = "RoPE-Tie: text and images with multimodal rotary positions"
    snippet = readme_snippet(heading)
    monkeypatch.chdir(tmp_path)
    namespace = run_readme_snippet(heading)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    claimed = re.search(r"# (\[\[2\.0.*)", snippet).group(1)
    assert printed == claimed
    assert torch.isfinite(namespace["loss"]) and namespace["out"].shape[0] == 2
    assert type(namespace["processor"]) is hf_ext.HfExtProcessor


def test_static_cache_generation_equals_dynamic_with_images():
    model, processor = _image_model("rope_tie_v1")
    batch = _mixed_batch(processor)
    markers = [processor.model_config_kwargs[key] for key in ("image_token_id", "image_start_token_id",
                                                              "image_end_token_id")]
    settings = dict(max_new_tokens=5, do_sample=False, suppress_tokens=markers)
    assert torch.equal(model.generate(**batch, **settings),
                       model.generate(**batch, **settings, cache_implementation="static"))
