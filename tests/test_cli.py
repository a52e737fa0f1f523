"""The `hf-ext` command: help, info, demo on a user's own text, convert, bench listing."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_ext import assets
from hf_ext.cli import main


def test_help_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "hf_ext.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("info", "demo", "bench", "convert"):
        assert command in result.stdout
        sub = subprocess.run([sys.executable, "-m", "hf_ext.cli", command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and len(sub.stdout) > 200


@pytest.mark.smoke
def test_info_lists_versions_and_registrations(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["registered"]["model_types"] == ["hf_ext"]
    assert {"sdpa", "eager"} <= set(info["attention_implementations"])
    import transformers
    from hf_ext._versions import SUPPORTED_VERSIONS

    assert info["libraries"]["transformers"] == {"installed": transformers.__version__,
                                                 "minimum": SUPPORTED_VERSIONS["transformers"].minimum,
                                                 "newest_tested": SUPPORTED_VERSIONS["transformers"].newest_tested}
    assert "hfext-tiny" in info["presets"]


@pytest.mark.smoke
def test_demo_runs_on_a_users_own_text_file(tmp_path, capsys):
    text = tmp_path / "my_text.txt"
    text.write_text(assets.stdlib_docstrings(120_000))
    out = tmp_path / "out"
    assert main(["demo", "--text-file", str(text), "--output-dir", str(out), "--preset", "hfext-tiny",
                 "--max-steps", "8", "--batch-size", "4", "--prompt", "Python"]) == 0
    printed = capsys.readouterr().out
    assert "hf_ext demo report" in printed and "tokens/s" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["text"]["files"] == 1
    assert report["training"]["eval_loss_after"] < report["training"]["eval_loss_before"]
    assert report["checkpoint"]["reload_max_abs_logit_difference"] == 0.0
    assert len(report["generation"]["continuation"]) > 0
    assert {"rope_loss_at_1024", "rerope_loss_at_1024", "rope_loss_at_128"} <= set(report["extrapolation"])
    assert "extrapolation: loss on the same 128 tokens with 1024 tokens of context" in printed
    lora = report["lora_ga"]
    assert lora["lora_ga_eval_loss"] < report["training"]["eval_loss_after"]  # the fine-tuning step trained
    assert lora["reload_max_abs_logit_difference"] < 1e-4  # plain LoRA adapter on the untouched base
    assert "LoRA-GA      : rank 8" in printed
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.model_type == "hf_ext"
    mla = report["mla"]
    assert mla["exact_max_abs_logit_difference"] < 1e-4
    kv = mla["kv_bytes_per_token_bf16"]
    assert kv["mla_exact"] == kv["gqa"] and kv["mla_compressed"] < kv["gqa"]
    assert set(mla["decode_tokens_per_second"]) == {"context", "gqa", "mla_absorbed", "mla_expanded"}
    assert "MLA          : exact conversion max |Δlogit|" in printed
    rope_tie = report["rope_tie"]
    assert rope_tie["positions"]["rope_tie_v2"][3] == [5.0, 4.5]  # the spec's worked example: first patch
    assert rope_tie["positions"]["rope_tie_v1"][9] == [14.0, 14.0]  # image end = (L + (w+1)(h+1)) with L = 2
    assert max(rope_tie["generate_vs_full_forward_max_abs_logit_difference"].values()) < 1e-4
    assert "RoPE-Tie     : positions of 'what is <image> left of 7'" in printed
    reflow = report["reflow"]
    assert reflow["2-RF"]["straightness"] < 0.1 * reflow["1-RF"]["straightness"]
    assert reflow["2-RF"]["distance_by_steps"]["1"] < 0.5 * reflow["1-RF"]["distance_by_steps"]["1"]
    assert (out / "reflow_2d.png").stat().st_size > 10_000
    assert "reflow (2-D) : distance to data at 1/2/32 Euler steps" in printed


@pytest.mark.smoke
def test_demo_text_falls_back_to_the_stdlib_docstrings_without_the_python_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "PYTHON_DOC_SOURCES", tmp_path / "not-installed")
    files, source = assets.default_text_files(max_characters=500_000, scratch_dir=tmp_path / "out")
    assert "standard library" in source and files == [tmp_path / "out" / "python_stdlib_docstrings.txt"]
    text = files[0].read_text()
    assert 500_000 <= len(text) < 600_000  # about the characters asked for (whole docstrings)
    import __future__  # the first module in sorted order: its docstring, word for word
    import inspect

    assert text.startswith(inspect.cleandoc(__future__.__doc__))


def test_demo_rejects_a_missing_text_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_files"):
        main(["demo", "--text-file", str(tmp_path / "nope.txt"), "--output-dir", str(tmp_path)])


def test_convert_command_writes_a_loadable_checkpoint(tmp_path):
    source = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    source.save_pretrained(tmp_path / "llama")
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "hfext")]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hfext").eval()
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=0, atol=1e-5)
    # a non-empty output folder is never overwritten silently
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "hfext")]) == 2
    # GQA -> MLA, exact with the defaults; compressed with options
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "mla"), "--to-mla"]) == 0
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "mla").eval()
    assert mla.config.attention_types == ["mla", "mla"]
    torch.testing.assert_close(mla(ids).logits, source(ids).logits, rtol=0, atol=1e-5)
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "small"), "--to-mla", "--kv-lora-rank", "8",
                 "--qk-rope-head-dim", "4"]) == 0
    small = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "small"))
    assert (small.config.kv_lora_rank, small.config.qk_rope_head_dim) == (8, 4)


def test_convert_command_recognises_deepseek_checkpoints(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    source = DeepseekV3ForCausalLM(DeepseekV3Config(vocab_size=50, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=2)).eval()
    source.save_pretrained(tmp_path / "deepseek")
    assert main(["convert", str(tmp_path / "deepseek"), str(tmp_path / "hfext")]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hfext").eval()
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=0, atol=1e-5)


def test_bench_lists_the_benchmarks(capsys):
    assert main(["bench", "--list"]) == 0
    assert "decoder_vs_llama" in capsys.readouterr().out


def test_example_hybrid_quickstart_runs(tmp_path):
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "hybrid_model_quickstart.py"
    result = subprocess.run([sys.executable, str(example), "--output-dir", str(tmp_path), "--max-steps", "3"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per-layer scheme: [('sliding_attention', 'rope'), ('sliding_attention', 'rope'), ('full_attention', 'none')" in result.stdout


def test_example_finetune_smollm2_with_lion_and_tail_capped_loss_runs(tmp_path):
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "finetune_smollm2_lion_tail_capped.py"
    result = subprocess.run([sys.executable, str(example), "--output-dir", str(tmp_path), "--max-steps", "2"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer: Lion" in result.stdout and "held-out loss:" in result.stdout
