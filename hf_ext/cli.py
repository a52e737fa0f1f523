"""The `hf-ext` command: info, demo, convert.

Benchmarks are not part of the installed package: from a checkout of the repository run
``python -m benchmarks.NAME`` (``python -m benchmarks`` lists them).
"""

import argparse
import json
import platform
import sys
from pathlib import Path

DESCRIPTION = """\
hf_ext: research techniques from Scientific Spaces (kexue.fm) as transformers / PEFT / diffusers components.
Run `hf-ext COMMAND --help` for the options of a command. Benchmarks run from a checkout of the repository:
`python -m benchmarks.NAME` (`python -m benchmarks` lists them).
"""


def _info(args) -> int:
    import torch
    from transformers import AttentionInterface

    import hf_ext
    from hf_ext._versions import SUPPORTED_VERSIONS, installed_version
    from hf_ext.hub import list_presets
    from hf_ext.registry import registered_summary

    summary = registered_summary()
    info = {
        "hf_ext": hf_ext.__version__,
        "python": platform.python_version(),
        "libraries": {name: {"installed": installed_version(name), "minimum": spec.minimum,
                             "newest_tested": spec.newest_tested}
                      for name, spec in SUPPORTED_VERSIONS.items()},
        "torch_threads": torch.get_num_threads(),
        "registered": summary,
        "attention_implementations": ["eager", *sorted(AttentionInterface._global_mapping)],
        "presets": list_presets(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"hf_ext {info['hf_ext']} (python {info['python']}, torch threads {info['torch_threads']})")
    print("libraries:")
    for name, versions in info["libraries"].items():
        print(f"  {name:<13} {versions['installed'] or 'not installed':<14} needs >={versions['minimum']}, "
              f"tested up to {versions['newest_tested']}")
    print(f"model types registered : {', '.join(summary['model_types'])} "
          f"(with {', '.join(summary['auto_classes'])})")
    print(f"hf_ext attention       : {', '.join(summary['attention_implementations']) or '(none yet)'}")
    print(f"diffusers schedulers   : {', '.join(summary['diffusers_schedulers'])}")
    print(f"all attention backends : {', '.join(info['attention_implementations'])}")
    print(f"presets (hub_configs/) : {', '.join(info['presets'])}")
    return 0


def _demo(args) -> int:
    from hf_ext.demo import DemoSettings, format_report, run_demo

    settings = DemoSettings(output_dir=Path(args.output_dir), preset=args.preset, max_steps=args.max_steps,
                            text_files=[Path(p) for p in args.text_file] or None, prompt=args.prompt,
                            batch_size=args.batch_size)
    report = run_demo(settings)
    print()
    print(format_report(report))
    return 0


def _convert(args) -> int:
    import hf_ext

    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"error: output_dir {output} is not empty; pass --overwrite to replace its files", file=sys.stderr)
        return 2
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(args.source, **kwargs).model_type
    if args.format != "hfext" and not args.to_mla:
        print("error: --format applies to --to-mla", file=sys.stderr)
        return 2
    if args.calibration_file and not args.to_mla:
        print("error: --calibration-file applies to --to-mla", file=sys.stderr)
        return 2
    if args.calibration_tokens is not None and (not args.calibration_file or args.calibration_tokens < CALIBRATION_BLOCK):
        print(f"error: --calibration-tokens needs --calibration-file and at least {CALIBRATION_BLOCK} tokens",
              file=sys.stderr)
        return 2
    if args.to_mla:
        calibration = None
        if args.calibration_file:
            calibration = _calibration_ids(args.source, args.calibration_file, args.calibration_tokens or 2048, kwargs)
            if calibration is None:
                print(f"error: --calibration-file {args.calibration_file} has fewer than {CALIBRATION_BLOCK} tokens",
                      file=sys.stderr)
                return 2
        model = hf_ext.convert.to_mla(args.source, kv_lora_rank=args.kv_lora_rank,
                                      qk_rope_head_dim=args.qk_rope_head_dim, calibration_input_ids=calibration,
                                      output_format=args.format, **kwargs)
    elif model_type in hf_ext.convert.SUPPORTED_DEEPSEEK_FAMILIES:
        model = hf_ext.convert.from_deepseek(args.source, **kwargs)
    else:
        model = hf_ext.convert.from_llama(args.source, **kwargs)
    model.save_pretrained(output)
    try:  # carry the tokenizer along when the source has one
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.source, **kwargs).save_pretrained(output)
    except (OSError, ValueError):
        pass
    if model.config.model_type == "deepseek_v3":
        print(f"saved DeepSeek-V3 checkpoint to {output} ({model.config.num_hidden_layers} MLA layers, latent "
              f"{model.config.kv_lora_rank} + rotary key {model.config.qk_rope_head_dim} per token and layer)")
        return 0
    kinds = sorted(set(model.config.attention_types))
    print(f"saved HfExt checkpoint to {output} ({model.config.num_hidden_layers} layers, attention {', '.join(kinds)})")
    return 0


CALIBRATION_BLOCK = 256  # tokens per calibration sequence


def _calibration_ids(source, path, tokens: int, kwargs):
    """The first `tokens` tokens of the text file `path` as [blocks, 256] ids for to_mla (None if under 256)."""
    import torch
    from transformers import AutoTokenizer

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = AutoTokenizer.from_pretrained(source, **kwargs)(text)["input_ids"][:tokens]
    blocks = len(ids) // CALIBRATION_BLOCK
    if blocks == 0:
        return None
    return torch.tensor(ids[: blocks * CALIBRATION_BLOCK]).view(blocks, CALIBRATION_BLOCK)


def build_parser() -> argparse.ArgumentParser:
    from hf_ext.demo import DemoSettings  # for the defaults the help shows

    parser = argparse.ArgumentParser(prog="hf-ext", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser("info", help="versions, what `import hf_ext` registers, attention implementations",
                               description="Print library versions (installed and supported), what `import hf_ext` "
                                           "registers and every attention implementation transformers now knows.")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=_info)

    demo = commands.add_parser(
        "demo", help="the main job: train, save, reload and generate with a small HfExt model on real text",
        description="The main job, offline on embedded defaults: train a BPE tokenizer and an HfExt model (preset "
                    "hfext-small) with Trainer, Lion and the fused tail-capped loss on the Python documentation "
                    "(Debian python3.11-doc; the standard library's docstrings where that is missing) or on your own "
                    "text files, save it, reload it through AutoModelForCausalLM and generate a continuation; then one "
                    "short step per capability (LoRA-GA fine-tuning, ReRoPE at 8x the training length, GQA->MLA "
                    "conversion, RoPE-Tie positions, rectified flow and reflow in 2-D). Prints a report (eval loss "
                    "before/after, tokens/s, checkpoint path, a line per capability) and writes report.json. Longer "
                    "showcases: examples/ in the repository.")
    demo.add_argument("--text-file", action="append", default=[], metavar="PATH",
                      help="your own plain-text file (repeatable); default: the Python documentation, else "
                           "the standard library's docstrings")
    defaults = DemoSettings()
    demo.add_argument("--output-dir", default=str(defaults.output_dir), help="where the checkpoint and report go")
    demo.add_argument("--preset", default=defaults.preset, help="config preset from hub_configs/")
    demo.add_argument("--max-steps", type=int, default=defaults.max_steps,
                      help=f"training steps (default {defaults.max_steps})")
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help=f"blocks of {defaults.block_size} tokens per step (default {defaults.batch_size})")
    demo.add_argument("--prompt", default=defaults.prompt, help="text to continue")
    demo.set_defaults(handler=_demo)

    convert = commands.add_parser(
        "convert", help="Llama / Mistral / Qwen2 / Qwen3 / SmolLM / dense DeepSeek-V2/V3 checkpoint -> HfExt checkpoint",
        description="Convert a Llama / Mistral / Qwen2 / Qwen3 / SmolLM checkpoint (folder or Hub id) into an "
                    "HfExt checkpoint with the same logits, saved with its tokenizer.")
    convert.add_argument("source", help="folder or Hub id of the source checkpoint")
    convert.add_argument("output_dir", help="folder to write the HfExt checkpoint to")
    convert.add_argument("--gguf-file", help="GGUF file name inside SOURCE, if the checkpoint is GGUF")
    convert.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    convert.add_argument("--to-mla", action="store_true",
                         help="convert the GQA attention to MLA (hf_ext.convert.to_mla; exact with the defaults)")
    convert.add_argument("--kv-lora-rank", type=int, help="with --to-mla: width of the cached latent")
    convert.add_argument("--qk-rope-head-dim", type=int, help="with --to-mla: rotary dimensions kept per head")
    convert.add_argument("--format", choices=("hfext", "deepseek"), default="hfext",
                         help="with --to-mla: write an HfExt checkpoint (default) or a DeepSeek-V3 one that "
                              "transformers' DeepseekV3ForCausalLM and DeepSeek-serving engines load")
    convert.add_argument("--calibration-file", help="with --to-mla: a text file whose tokens calibrate the "
                                                    "factorisation (strongly advised with --format deepseek)")
    convert.add_argument("--calibration-tokens", type=int,
                         help="with --calibration-file: how many of its first tokens to use (default 2048, at least "
                              f"{CALIBRATION_BLOCK})")
    convert.set_defaults(handler=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if getattr(args, "max_steps", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        parser.error("--max-steps and --batch-size must be positive integers")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
