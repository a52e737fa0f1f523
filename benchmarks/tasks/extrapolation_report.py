"""Reporting of the `extrapolation_miniature` benchmark: our accuracies next to the blog's, the copying indicator,
the markdown table for RESULTS.md, the console table and the accuracy-vs-length plot.
"""

from ..harness import log, pyplot


def side_by_side(rows: list, accuracy: dict, lengths: list[int], n: int, blog: dict) -> list[dict]:
    """Ours at N / 8×N (the blog's 4096 = 8×512 column) / 16×N next to the ``blog``'s numbers, one dict per row
    (``rows``: the benchmark's table rows, each with a ``name`` and the name of its ``blog`` row or None)."""
    table = []
    for row in rows:
        ours = accuracy[row.name]
        entry = {"row": row.name, "ours_train_length_natural": ours["natural"].get(n)}
        for length in lengths:
            if length != n:
                entry[f"ours_{length // n}x_repeated"] = ours["repeated"][length]
                entry[f"ours_{length // n}x_natural"] = ours["natural"][length]
        entry["blog_row"] = row.blog
        entry.update({f"blog_{key}": value for key, value in (blog.get(row.blog) or {}).items()})
        table.append(entry)
    return table


def copying_indicator(accuracy: dict, lengths: list[int]) -> dict:
    """Per row: repeated minus natural accuracy (points) at each length.

    At the longest length more than 90 % of a repeated text's positions are exact copies of tokens N/2 … N back,
    so a model that retrieves them scores far above its natural-text accuracy (the blog: about +33 to +35 points
    at 8×N); a difference near zero means the model does not copy, and the repeated column then tests nothing more
    than the natural one.
    """
    return {name: {length: by_text["repeated"][length] - by_text["natural"][length] for length in lengths}
            for name, by_text in accuracy.items()}


def markdown_table(table: list[dict], lengths: list[int], n: int, settings: dict) -> str:
    """Ours next to the blog's numbers, for benchmarks/RESULTS.md."""
    columns = [("ours_train_length_natural", f"ours {n} (N)")] if n in lengths else []
    for length in lengths:
        if length != n:
            columns += [(f"ours_{length // n}x_repeated", f"ours {length} rep"),
                        (f"ours_{length // n}x_natural", f"ours {length} nat")]
    columns += [("blog_train", "blog 512 (N)"), ("blog_repeated_8x", "blog 4096 rep"),
                ("blog_natural_8x", "blog 4096 nat")]
    model = settings["model"]
    lines = [
        f"Next-token accuracy (%). Ours: HfExt {model['num_hidden_layers']} layers × {model['hidden_size']}, "
        f"{settings['steps']} steps of {settings['batch_size']} × {n} tokens of Python documentation, evaluated on "
        f"held-out documents; inference-time rows reuse the trained baseline. Blog: GAU ~100M at N = 512 "
        "(4096 = 8×N; its ReRoPE/Leaky rows marked log n were trained with log n, ours only retro-fit it: log n†).",
        "",
        "| row | " + " | ".join(title for _, title in columns) + " | blog row |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    for entry in table:
        cells = [entry.get(key) for key, _ in columns]
        lines.append(f"| {entry['row']} | " + " | ".join(f"{c:.2f}" if isinstance(c, float) else "—" for c in cells)
                     + f" | {entry['blog_row'] or '—'} |")
    return "\n".join(lines)


def plot(accuracy: dict, n: int, title: str):
    """Accuracy vs evaluation length, one line per row; natural and repeated text side by side: a figure, or None
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colors = plt.get_cmap("tab20").colors
    for axis, text in zip(axes, ("natural", "repeated")):
        for index, (name, by_text) in enumerate(accuracy.items()):
            lengths = sorted(by_text[text])
            # Inference-time variants of the baseline dashed, separately trained models solid.
            style = "-" if name == "RoPE baseline" or name.startswith("HWFA") else "--"
            axis.plot(lengths, [by_text[text][x] for x in lengths], marker="o", linestyle=style,
                      color=colors[index % len(colors)], label=name)
        lengths = sorted({x for by_text in accuracy.values() for x in by_text[text]})
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(x) for x in lengths])
        axis.minorticks_off()
        axis.axvline(n, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{text} held-out text")
        axis.set_xlabel(f"evaluation length (tokens); dotted: training length N = {n}")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("next-token accuracy (%)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def print_side_by_side(table: list[dict], lengths: list[int], n: int) -> None:
    """The side-by-side table on the console."""
    columns = [("ours_train_length_natural", "ours N")] if n in lengths else []
    for length in lengths:
        if length != n:
            columns += [(f"ours_{length // n}x_repeated", f"{length // n}N rep"),
                        (f"ours_{length // n}x_natural", f"{length // n}N nat")]
    columns += [("blog_train", "blog N"), ("blog_repeated_8x", "blog 8N rep"), ("blog_natural_8x", "blog 8N nat")]
    log("\n" + f"{'row':<38}" + "".join(f"{title:>12}" for _, title in columns))
    for entry in table:
        cells = [entry.get(key) for key, _ in columns]
        log(f"{entry['row']:<38}" + "".join(f"{c:12.2f}" if isinstance(c, float) else f"{'—':>12}" for c in cells))


def string_keys(value):
    """JSON-friendly copy: integer length keys become strings."""
    if isinstance(value, dict):
        return {str(k): string_keys(v) for k, v in value.items()}
    return value
