"""The `hf-ext` command: help, info, demo on a user's own text, convert."""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_ext import demo
from hf_ext.cli import main


def test_help_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "hf_ext.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("info", "demo", "convert"):
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
    text.write_text(demo.stdlib_docstrings(120_000))
    out = tmp_path / "out"
    assert main(["demo", "--text-file", str(text), "--output-dir", str(out), "--preset", "hfext-tiny",
                 "--max-steps", "8", "--batch-size", "4", "--prompt", "Python"]) == 0
    printed = capsys.readouterr().out
    assert "hf_ext demo report" in printed and "tokens/s" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["text"]["files"] == 1 and "your text files" in report["text"]["summary"]
    training = report["training"]
    assert training["eval_loss_after"] < training["eval_loss_before"]
    assert f"eval loss {training['eval_loss_before']:.3f} before -> {training['eval_loss_after']:.3f} after" in printed
    assert report["checkpoint"]["reload_max_abs_logit_difference"] == 0.0
    assert len(report["generation"]["continuation"]) > 0
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "hf_ext"
    lora = report["lora_ga"]
    assert lora["eval_loss"] < training["eval_loss_after"]  # the fine-tuning step trained
    assert lora["reload_max_abs_logit_difference"] < 1e-4  # plain LoRA adapter on the untouched base
    assert "LoRA-GA    : rank 8, 40 steps" in printed
    assert {"rope_loss_at_1024", "rerope_loss_at_1024", "rope_loss_at_128", "rerope_loss_at_128"} <= set(
        report["extrapolation"])
    assert "ReRoPE     : loss on the same 127 tokens after 128 / 1024 tokens" in printed
    mla = report["mla"]
    assert mla["exact_max_abs_logit_difference"] < 1e-4
    assert mla["kv_bytes_per_token_bf16"]["mla"] < mla["kv_bytes_per_token_bf16"]["gqa"]
    assert "MLA        : exact conversion max |Δlogit|" in printed
    positions = report["rope_tie"]["positions"]
    assert positions["rope_tie_v2"][3] == [5.0, 4.5]  # the spec's worked example: first patch
    assert positions["rope_tie_v1"][9] == [14.0, 14.0]  # image end = (L + (w+1)(h+1)) with L = 2
    assert positions["flatten"] == [[float(i)] for i in range(13)]
    assert "RoPE-Tie   : positions around a 2 × 3-patch image" in printed
    row = next(line for line in printed.splitlines() if "patch1,2" in line)  # the table: a column per layout
    assert re.split(r"\s{2,}", row.strip()) == ["patch1,2", "8", "3, 4, 5", "10, 11", "6, 6.5"]
    reflow = report["reflow"]
    assert reflow["straightness"]["2-RF"] < 0.1 * reflow["straightness"]["1-RF"]
    one_step = {name: reflow["off_mode"][name][0] for name in ("1-RF", "2-RF")}
    assert one_step["2-RF"] < 0.5 * one_step["1-RF"]  # one Euler step: 2-RF lands near a mode, 1-RF between them
    assert reflow["off_mode"]["1-RF"][2] < 2 * reflow["off_mode"]["data"][0] + 0.2  # 32 steps: near the data
    assert "reflow 2-D : mean distance to the nearest mode after 1/2/32 Euler steps" in printed


@pytest.mark.smoke
def test_demo_text_falls_back_to_the_stdlib_docstrings_without_the_python_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PYTHON_DOC_SOURCES", tmp_path / "not-installed")
    run = demo.DemoRun(demo.DemoSettings(max_characters=500_000, output_dir=tmp_path / "out"))
    demo.load_text(run)
    assert run.report["text"]["source"] == "the standard library's docstrings"
    text = (tmp_path / "out" / "python_stdlib_docstrings.txt").read_text()
    assert 500_000 <= len(text) < 600_000  # about the characters asked for (whole docstrings)
    assert len(run.artifacts["text"]) > 1000  # paragraphs
    import __future__  # the first module in sorted order: its docstring, word for word
    import inspect

    assert text.startswith(inspect.cleandoc(__future__.__doc__))


def test_demo_rejects_a_missing_text_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
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
