"""Tables and plots of evaluation results (pipeline.evaluate's result dicts): one row per model
and N, several models side by side."""

import math


def markdown_table(results):
    types = sorted({t for r in results for t in r["accuracy_by_type"]})
    counts = {t: max(r["samples_by_type"].get(t, 0) for r in results) for t in types}
    header = ["model", "N", "accuracy", *(f"{t} (n={counts[t]})" for t in types), "loss", "prefill ms",
              "vision tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["model"], str(r["num_vision_tokens"]), f"{r['accuracy']:.3f}",
                 *(f"{r['accuracy_by_type'][t]:.3f}" if t in r["accuracy_by_type"] else "-" for t in types),
                 "-" if r["loss"] is None else f"{r['loss']:.4f}", f"{r['prefill_ms']:.2f}",
                 f"{r['vision_tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Accuracy per question type vs N (left) and prefill latency vs N (right); colour is the
    question type, line style the model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(r["model"] for r in results))
    types = ["overall", *sorted({t for r in results for t in r["accuracy_by_type"]})]
    styles = dict(zip(models, ["-", "--", ":", "-."] * len(models)))
    colours = dict(zip(types, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(types)))
    ns = sorted({r["num_vision_tokens"] for r in results})
    fig, (accuracy_ax, latency_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in models:
        rows = [r for r in results if r["model"] == model]
        x = [r["num_vision_tokens"] for r in rows]
        for t in types:
            y = [r["accuracy"] if t == "overall" else r["accuracy_by_type"].get(t, math.nan) for r in rows]
            accuracy_ax.plot(x, y, styles[model], marker="o", color=colours[t], linewidth=2.5 if t == "overall" else 1.2)
        latency_ax.plot(x, [r["prefill_ms"] for r in rows], styles[model], marker="o", color="black")
    type_handles = [Line2D([], [], color=colours[t], label=t) for t in types]
    model_handles = [Line2D([], [], color="gray", linestyle=styles[m], label=m) for m in models]
    accuracy_ax.legend(handles=type_handles + model_handles, fontsize=8)
    latency_ax.legend(handles=[Line2D([], [], color="black", linestyle=styles[m], label=m) for m in models], fontsize=8)
    for ax, ylabel in ((accuracy_ax, "exact-match accuracy"), (latency_ax, "median prefill per batch (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("vision tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    accuracy_ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
