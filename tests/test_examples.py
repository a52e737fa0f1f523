"""Every script of examples/ runs with small settings and prints (and returns) what it claims."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_every_example_is_tested_here_and_runs_as_a_module():
    examples = sorted(path.stem for path in (ROOT / "examples").glob("*.py") if path.stem != "__init__")
    source = Path(__file__).read_text()
    assert [name for name in examples if f"examples.{name} import" not in source] == []
    # `python -m examples.NAME` from the repository root, as the docstrings say (argparse help: nothing runs)
    result = subprocess.run([sys.executable, "-m", "examples.reflow_2d", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "python -m examples.reflow_2d" in result.stdout, result.stderr[-2000:]


def test_hybrid_model_quickstart(tmp_path, capsys):
    from examples.hybrid_model_quickstart import main

    report = main(["--output-dir", str(tmp_path), "--max-steps", "3"])
    printed = capsys.readouterr().out
    assert report["layer_scheme"] == [("sliding_attention", "rope"), ("sliding_attention", "rope"),
                                      ("full_attention", "none"), ("sliding_attention", "rope")]
    assert "per-layer scheme: [('sliding_attention', 'rope')" in printed and "hybrid (examples/)" in printed
    assert report["checkpoint"]["reload_max_abs_logit_difference"] == 0.0
    assert "lora_ga" not in report  # the main job only


@pytest.mark.slow
def test_finetune_smollm2_lion_tail_capped(tmp_path, capsys):
    from examples.finetune_smollm2_lion_tail_capped import main

    result = main(["--output-dir", str(tmp_path), "--max-steps", "2"])
    printed = capsys.readouterr().out
    assert result["optimizer"] == "Lion" and "optimizer: Lion" in printed
    assert f"held-out loss: {result['eval_loss_before']:.3f} -> {result['eval_loss_after']:.3f}" in printed


def test_reflow_2d(tmp_path, capsys):
    from examples.reflow_2d import main

    report = main(["--training-steps", "400", "--pairs", "4000", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    one, two = report["1-RF"], report["2-RF"]
    assert two["straightness"] < 0.2 * one["straightness"]
    assert two["distance_by_steps"][1] < 0.5 * one["distance_by_steps"][1]  # reflow: one step nearly suffices
    assert one["distance_by_steps"][32] < one["distance_by_steps"][1]  # 1-RF needs many steps
    assert f"2-RF: straightness {two['straightness']:.4f}" in printed
    assert f"data vs data: {report['data_floor']:.3f}" in printed
    assert Path(report["picture"]).stat().st_size > 10_000


def test_ropetie_digit_canvas(capsys):
    from examples.ropetie_digit_canvas import main

    report = main(["--new-tokens", "3"])
    printed = capsys.readouterr().out
    positions = report["positions"]
    assert report["tokens"][3] == "patch 0,0" and report["tokens"][9] == "<image_end>"
    assert positions["rope_tie_v2"][3] == [5.0, 4.5]  # first patch: (β₁ + r, β₂ + c), half-integers
    assert positions["rope_tie_v1"][9] == [14.0, 14.0]
    assert positions["mrope"][8] == [3.0, 4.0, 5.0]  # last patch: (t, row, col)
    assert max(report["generate_vs_full_forward_max_abs_logit_difference"].values()) < 1e-4
    row = next(line for line in printed.splitlines() if line.startswith("patch 0,0"))
    assert row.split() == ["patch", "0,0", "3", "3,", "3,", "3", "6,", "5", "5,", "4.5"]


@pytest.mark.slow
def test_mla_conversion(capsys):
    from examples.mla_conversion import main

    report = main(["--block-size", "64", "--calibration-blocks", "2", "--eval-blocks", "2", "--context", "96",
                   "--new-tokens", "3"])
    printed = capsys.readouterr().out
    kv = report["kv_bytes_per_token_bf16"]
    assert report["exact_max_abs_logit_difference"] < 1e-3  # SmolLM2-135M, exact conversion
    assert kv["mla_exact"] == kv["gqa"] and kv["mla"] < kv["gqa"]
    loss = report["eval_loss"]
    assert abs(loss["mla"] - loss["gqa"]) < 1.0 and all(torch.isfinite(torch.tensor(list(loss.values()))))
    assert set(report["decode_tokens_per_second"]) == {"gqa", "mla_absorbed", "mla_expanded"}
    assert report["context"] == 96
    assert f"held-out loss {loss['gqa']:.3f} -> {loss['mla']:.3f}" in printed
    assert "decode after 96 tokens: MLA absorbed" in printed
