"""Tables and plots of tools.evaluate's results (pipeline.evaluate's result dicts) and of
tools.benchmark's (pipeline.lmms_eval_model.sweep's): one row per model and N, several models
side by side."""

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


# ---- tools.benchmark: lmms-eval scores and prefill latency per model and N ----

def latency_cell(latency):
    """'median (q1–q3)' of a latency_ms dict, in ms; '-' when there is none."""
    return "-" if latency is None else f"{latency['median']:.2f} ({latency['q1']:.2f}–{latency['q3']:.2f})"


def latency_noise(results):
    """The models whose prefill spread (q3 - q1) at some N is larger than the range of their
    medians across N: their timings cannot rank the token counts."""
    noisy = []
    for model in dict.fromkeys(r["model"] for r in results):
        timed = [r["prefill_ms"] for r in results if r["model"] == model and r["prefill_ms"]]
        medians = [t["median"] for t in timed]
        if len(timed) > 1 and max(t["q3"] - t["q1"] for t in timed) > max(medians) - min(medians):
            noisy.append(model)
    return noisy


def noise_warning(results):
    noisy = latency_noise(results)
    return (f"The prefill's spread is larger than its differences across N for {', '.join(noisy)}: these "
            f"timings do not rank the token counts (a busy machine?)." if noisy else None)


def metric_names(results):
    return list(dict.fromkeys(metric for r in results for metric in r["scores"]))


def benchmark_table(report):
    """A caption (documents per task, how the prefill is timed, a noise warning, a failure) and a
    row per model and N: each task metric, then the prefill's median and quartiles."""
    results = report["results"]
    metrics = metric_names(results)
    documents = {task: n for r in results for task, n in r["samples"].items()}
    caption = [f"lmms-eval scores (documents: {', '.join(f'{task} {n}' for task, n in documents.items()) or 'none'}); "
               f"prefill ms: median (q1–q3) of {report['timing_repeats']} timed prefills, after a warm-up, of a "
               f"batch of {report['batch_size']} prompts with one image each."]
    if noise_warning(results):
        caption.append(noise_warning(results))
    if "failure" in report:
        failure = report["failure"]
        caption.append(f"Failed: model {failure['model']} at N={failure['num_vision_tokens']}, task "
                       f"{failure['task']}: {failure['error']}")
    header = ["model", "N", *metrics, "prefill ms"]
    lines = ["\n\n".join(caption) + "\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["model"], str(r["num_vision_tokens"]),
                 *(f"{r['scores'][m]:.4g}" if m in r["scores"] else "-" for m in metrics), latency_cell(r["prefill_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_benchmark(results, path):
    """One panel per task metric and one for the prefill latency (median, q1–q3 as error bars;
    its title says when the spread is larger than the differences), against N; one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [*metric_names(results), "prefill ms"]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    ns = sorted({r["num_vision_tokens"] for r in results})
    for ax, panel in zip(axes.flat, panels):
        for model in dict.fromkeys(r["model"] for r in results):
            rows_of_model = [r for r in results if r["model"] == model]
            x = [r["num_vision_tokens"] for r in rows_of_model]
            if panel == "prefill ms":
                timed = [r["prefill_ms"] or {"median": math.nan, "q1": math.nan, "q3": math.nan} for r in rows_of_model]
                y = [t["median"] for t in timed]
                spread = [[t["median"] - t["q1"] for t in timed], [t["q3"] - t["median"] for t in timed]]
                ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=model)
            else:
                ax.plot(x, [r["scores"].get(panel, math.nan) for r in rows_of_model], marker="o", label=model)
        title = panel
        if panel == "prefill ms":
            title = "prefill ms: median, q1–q3" + ("\nspread > differences across N: noise" if latency_noise(results) else "")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("vision tokens N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
