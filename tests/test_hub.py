"""Hub-readiness: save/load round trips, trust_remote_code without hf_ext, offline push_to_hub with the model card."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import hybrid_config
from fake_hub import FakeHub
from transformers import AutoConfig, AutoModelForCausalLM

import hf_ext


def _model_and_ids(**config_overrides):
    model = AutoModelForCausalLM.from_config(hybrid_config(**config_overrides)).eval()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(7))
    return model, ids


@pytest.mark.smoke
def test_save_and_load_give_identical_logits(tmp_path):
    model, ids = _model_and_ids()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == [
        "configuration_hfext.py", "mla_hfext.py", "modeling_hfext.py", "ops_hfext.py", "positions_hfext.py",
        "rerope_hfext.py"]
    assert not list(tmp_path.glob("*.bin")), "weights must be safetensors only"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfext.HfExtForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is hf_ext.HfExtForCausalLM  # the installed class wins over the copied code
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # the rotary buffers are not stored; they must have been recomputed after meta-device loading
    torch.testing.assert_close(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("overrides", [{}, {"attention_types": ["mla", "gqa", "mla"], "kv_lora_rank": 16,
                                              "q_lora_rank": 24, "rope_interleave": True}], ids=["gqa", "mla"])
@pytest.mark.smoke
def test_trust_remote_code_loads_where_hf_ext_is_not_importable(tmp_path, overrides):
    model, ids = _model_and_ids(**overrides)
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model(ids).logits.detach(), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_ext"] = None  # any `import hf_ext` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "checkpoint")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        print("max_diff", (model(ids).logits - expected).abs().max().item())
        print("generate", model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1])
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("max_diff", "generate")))
    assert float(lines["max_diff"]) == 0.0
    assert lines["generate"] == "7"


@pytest.mark.smoke
def test_push_to_hub_uploads_weights_code_and_model_card(tmp_path):
    model, ids = _model_and_ids()
    with FakeHub(tmp_path / "hub") as hub:
        model.push_to_hub("me/tiny-hybrid")
    (commit,) = hub.commits
    assert commit.repo_id == "me/tiny-hybrid"
    assert {"README.md", "config.json", "model.safetensors", "modeling_hfext.py", "configuration_hfext.py"} <= set(commit.files)
    card = (hub.repo_dir("me/tiny-hybrid") / "README.md").read_text()
    assert "library_name: transformers" in card and "hf_ext" in card
    # the per-layer scheme
    assert "| 1 | GQA: 2 KV heads × 16 cached | full_attention | all previous tokens | none | yes |" in card
    assert "| 0 | GQA: 2 KV heads × 16 cached | sliding_attention | 5 | rope | no |" in card
    assert 'from_pretrained("me/tiny-hybrid", trust_remote_code=True)' in card
    reloaded = AutoModelForCausalLM.from_pretrained(hub.repo_dir("me/tiny-hybrid")).eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_push_to_hub_of_an_mla_model_describes_its_cache(tmp_path):
    model, _ = _model_and_ids(attention_types=["mla", "gqa", "mla"], kv_lora_rank=16, qk_rope_head_dim=8)
    with FakeHub(tmp_path / "hub") as hub:
        model.push_to_hub("me/tiny-mla")
    (commit,) = hub.commits
    assert {"modeling_hfext.py", "mla_hfext.py"} <= set(commit.files)
    card = (hub.repo_dir("me/tiny-mla") / "README.md").read_text()
    assert "| 0 | MLA: latent 16 + 1×8 rotary cached | sliding_attention | 5 | rope | no |" in card
    assert "| 1 | GQA: 2 KV heads × 16 cached | full_attention |" in card


def test_push_to_hub_keeps_a_hand_written_card(tmp_path):
    model, _ = _model_and_ids()
    with FakeHub(tmp_path / "hub") as hub:
        readme = hub.repo_dir("me/mine") / "README.md"
        readme.parent.mkdir(parents=True)
        readme.write_text("---\nlicense: mit\n---\n# My own words\n")
        model.push_to_hub("me/mine", tags=["experiment"])
    card = readme.read_text()
    assert "# My own words" in card and "experiment" in card


def test_config_push_to_hub(tmp_path):
    with FakeHub(tmp_path / "hub") as hub:
        hybrid_config().push_to_hub("me/config-only")
    assert AutoConfig.from_pretrained(hub.repo_dir("me/config-only")).layer_types == hybrid_config().layer_types
