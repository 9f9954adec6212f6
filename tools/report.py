"""Tables and plots of tools.evaluate's results (pipeline.eval.heldout's result dicts; with --tokens
adaptive, pipeline.eval.adaptive's policy rows) and of tools.benchmark's (pipeline.eval.lmms_eval_sweep.sweep's):
one row per model (and tile limit) and N, several models side by side; tools.evaluate's accuracy
against vision tokens per image, one curve per tile limit (plot_tiles). Both give each row's
prefill latency as prefill_ms (the median) with its spread, prefill_ms_q1 to prefill_ms_q3."""

import math

import numpy as np

# ---- the prefill latency and its spread ----

def spread_cell(r):
    """'q1–q3' of a row's prefill, in ms; '-' for a row without one."""
    return "-" if r["prefill_ms"] is None else f"{r['prefill_ms_q1']:.2f}–{r['prefill_ms_q3']:.2f}"


def latency_noise(results):
    """The models whose prefill spread (q3 - q1) at some N is larger than the range of their
    medians across N: their timings cannot rank the token counts."""
    noisy = []
    for model in dict.fromkeys(r["model"] for r in results):
        timed = [r for r in results if r["model"] == model and r["prefill_ms"] is not None]
        medians = [r["prefill_ms"] for r in timed]
        if len(timed) > 1 and max(r["prefill_ms_q3"] - r["prefill_ms_q1"] for r in timed) > max(medians) - min(medians):
            noisy.append(model)
    return noisy


def noise_warning(results):
    noisy = latency_noise(results)
    return (f"The prefill's spread is larger than its differences across N for {', '.join(noisy)}: these "
            f"timings do not rank the token counts (a busy machine?)." if noisy else None)


def plot_latency(ax, results, model, **style):
    """A model's median prefill against N, q1–q3 as error bars."""
    rows = [r for r in results if r["model"] == model]
    medians = [math.nan if r["prefill_ms"] is None else r["prefill_ms"] for r in rows]
    below = [math.nan if r["prefill_ms"] is None else r["prefill_ms"] - r["prefill_ms_q1"] for r in rows]
    above = [math.nan if r["prefill_ms"] is None else r["prefill_ms_q3"] - r["prefill_ms"] for r in rows]
    ax.errorbar([r["num_vision_tokens"] for r in rows], medians, yerr=[below, above], marker="o", capsize=3, **style)


def latency_title(results):
    return "prefill ms: median, q1–q3" + ("\nspread > differences across N: noise" if latency_noise(results) else "")


# ---- tools.evaluate: accuracy, loss and prefill per model and N ----

def markdown_table(results):
    """A row per result; with clips in the data, their frames, M and vision tokens per clip too."""
    types = sorted({t for r in results for t in r["accuracy_by_type"]})
    counts = {t: max(r["samples_by_type"].get(t, 0) for r in results) for t in types}
    video = any(r.get("vision_tokens_per_clip") for r in results)
    header = ["model", "N", "tiles", "vision tokens per image", *(["frames", "M", "vision tokens per clip"] * video),
              "accuracy", *(f"{t} (n={counts[t]})" for t in types), "loss", "prefill ms", "prefill q1–q3",
              "vision tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        per_image, per_clip = r.get("vision_tokens_per_image"), r.get("vision_tokens_per_clip")
        clip_cells = [str(r["num_frames"]), str(r["num_frame_tokens"]), "-" if per_clip is None else f"{per_clip:.1f}"]
        cells = [r["model"], str(r["num_vision_tokens"]), str(r.get("num_tiles", 1)),
                 "-" if per_image is None else f"{per_image:.1f}", *(clip_cells * video), f"{r['accuracy']:.3f}",
                 *(f"{r['accuracy_by_type'][t]:.3f}" if t in r["accuracy_by_type"] else "-" for t in types),
                 "-" if r["loss"] is None else f"{r['loss']:.4f}", f"{r['prefill_ms']:.2f}", spread_cell(r),
                 f"{r['vision_tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    warning = noise_warning(results)
    return (f"{warning}\n\n" if warning else "") + "\n".join(lines) + "\n"


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
            accuracy_ax.plot(
                x, y, styles[model], marker="o", color=colours[t], linewidth=2.5 if t == "overall" else 1.2
            )
        plot_latency(latency_ax, results, model, linestyle=styles[model], color="black")
    type_handles = [Line2D([], [], color=colours[t], label=t) for t in types]
    model_handles = [Line2D([], [], color="gray", linestyle=styles[m], label=m) for m in models]
    accuracy_ax.legend(handles=type_handles + model_handles, fontsize=8)
    latency_ax.legend(handles=[Line2D([], [], color="black", linestyle=styles[m], label=m) for m in models], fontsize=8)
    latency_ax.set_title(latency_title(results), fontsize=10)
    for ax, ylabel in ((accuracy_ax, "exact-match accuracy"), (latency_ax, "prefill per batch (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("vision tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    accuracy_ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tiles(results, path):
    """Accuracy against the vision tokens per image (tiles x N plus row ends), one curve per model
    and tile limit, each point one N: where a model trades resolution (tiles) against tokens per
    tile (N), the curve to pick an operating point from."""
    curves = {}
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model and r["vision_tokens_per_image"]]
        if rows:
            curves[model if "tiles=" in model else f"{model} tiles={rows[0]['num_tiles']}"] = rows
    plot_accuracy_curves(curves, path, "vision_tokens_per_image", lambda r: f"N={r['num_vision_tokens']}",
                         "vision tokens per image (tiles x N + row ends, mean over images)")


def plot_frames(results, path):
    """Accuracy against the vision tokens per clip (frames x (M + a frame end)), one curve per model,
    N and frame count, each point one M: where frames trade against tokens per frame under one
    budget (a vertical line through the curves), the curve to pick an operating point from."""
    def key(r):
        return r["model"], r["num_vision_tokens"], r["num_frames"]

    clip_rows = [r for r in results if r.get("vision_tokens_per_clip")]
    keys = dict.fromkeys(map(key, clip_rows))
    curves = {}
    for model, n, frames in keys:
        label = model + (f" N={n}" if len({k[1] for k in keys}) > 1 else "") + ("" if "frames=" in model
                                                                                 else f" frames={frames}")
        curves[label] = [r for r in clip_rows if key(r) == (model, n, frames)]
    plot_accuracy_curves(curves, path, "vision_tokens_per_clip", lambda r: f"M={r['num_frame_tokens']}",
                         "vision tokens per clip (frames x (M + a frame end), mean over clips)")


def plot_accuracy_curves(curves: dict, path, x_key: str, point_label, xlabel: str) -> None:
    """One accuracy curve per label (its rows sorted by x_key, on a log-2 axis), each point annotated
    with point_label(row)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r[x_key])
        ax.plot([r[x_key] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
        for r in rows:
            ax.annotate(point_label(r), (r[x_key], r["accuracy"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if curves:  # clip-only data has no image curve (and no legend to draw)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the bench studies: accuracy over seeds, a panel per question kind ----

def plot_accuracy_panels(panels: dict, path, xlabel: str, xticks: list | None = None) -> None:
    """{panel title: [(label, xs, means, error bars, dashed), ...]}: one panel per question kind,
    accuracy against a log2 x axis, the error bars the spread over seeds (bench/flex_vs_fixed,
    bench/tiles_study)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), sharey=True)
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, xs, means, errors, dashed in curves:
            ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=label, linestyle="--" if dashed else "-")
        ax.set_xscale("log", base=2)
        if xticks:
            ax.set_xticks(xticks, [str(x) for x in xticks])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- tools.benchmark: lmms-eval scores and prefill latency per model and N ----

def metric_names(results):
    return list(dict.fromkeys(metric for r in results for metric in r["scores"]))


def benchmark_table(report):
    """A caption (documents per task, how the prefill is timed, a noise warning, a failure) and a
    row per model and N: each task metric, then the prefill's median and quartiles."""
    results = report["results"]
    metrics = metric_names(results)
    documents = {task: n for r in results for task, n in r["samples"].items()}
    caption = [f"lmms-eval scores (documents: {', '.join(f'{task} {n}' for task, n in documents.items()) or 'none'}); "
               f"prefill ms: the median (and q1–q3) of {report['timing_repeats']} timed prefills, after a warm-up, "
               f"of a batch of {report['batch_size']} prompts with one image each."]
    if noise_warning(results):
        caption.append(noise_warning(results))
    if "failure" in report:
        failure = report["failure"]
        caption.append(f"Failed: model {failure['model']} at N={failure['num_vision_tokens']}, task "
                       f"{failure['task']}: {failure['error']}")
    video = report.get("frame_limits", [None]) != [None] or report.get("frame_counts", [None]) != [None]
    header = ["model", "N", *(["frames", "M", "vision tokens per clip (at most)"] * video), *metrics, "prefill ms",
              "prefill q1–q3"]
    lines = ["\n\n".join(caption) + "\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        clip = [str(r["num_frames"]), str(r["num_frame_tokens"]), str(r["vision_tokens_per_clip"])] if video else []
        cells = [r["model"], str(r["num_vision_tokens"]), *clip,
                 *(f"{r['scores'][m]:.4g}" if m in r["scores"] else "-" for m in metrics),
                 "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.2f}", spread_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_benchmark(results, path):
    """One panel per task metric and one for the prefill latency (median, q1–q3 as error bars;
    its title says when the spread is larger than the differences), against N; one line per model."""
    panels = [*metric_names(results), "prefill ms"]
    fig, axes = panel_grid(len(panels))
    ns = sorted({r["num_vision_tokens"] for r in results})
    for ax, panel in zip(axes.flat, panels):
        for model in dict.fromkeys(r["model"] for r in results):
            rows_of_model = [r for r in results if r["model"] == model]
            x = [r["num_vision_tokens"] for r in rows_of_model]
            if panel == "prefill ms":
                plot_latency(ax, results, model, label=model)
            else:
                ax.plot(x, [r["scores"].get(panel, math.nan) for r in rows_of_model], marker="o", label=model)
        ax.set_title(latency_title(results) if panel == "prefill ms" else panel, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("vision tokens N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_panels(fig, axes, len(panels), path)


def plot_benchmark_frames(results, path):
    """One panel per task metric against the vision tokens a clip takes at most (frames x (M + a
    frame end)), one curve per model, N and frame count, each point one M."""
    metrics = metric_names(results)
    fig, axes = panel_grid(len(metrics))
    curves = dict.fromkeys((r["name"], r["num_tiles"], r["num_vision_tokens"], r["num_frames"]) for r in results)
    for ax, metric in zip(axes.flat, metrics):
        for name, tiles, n, frames in curves:
            points = sorted((r for r in results if (r["name"], r["num_tiles"], r["num_vision_tokens"], r["num_frames"])
                             == (name, tiles, n, frames)), key=lambda r: r["vision_tokens_per_clip"])
            label = f"{name}{'' if tiles is None else f' tiles={tiles}'} N={n} frames={frames}"
            ax.plot([r["vision_tokens_per_clip"] for r in points], [r["scores"].get(metric, math.nan) for r in points],
                    marker="o", label=label)
        ax.set_title(metric, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vision tokens per clip, at most")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_panels(fig, axes, len(metrics), path)


def panel_grid(count: int):
    """A figure of count panels, three to a row, and its 2-D array of axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = min(3, count)
    rows = math.ceil(count / columns)
    return plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)


def save_panels(fig, axes, used: int, path) -> None:
    """Hide the grid's panels past the first `used`, then write the figure and close it."""
    from matplotlib import pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- tools.evaluate --tokens adaptive: fixed N, the adaptive policy and the oracle ----

def goal_check(results, model):
    """The adaptive row against the best fixed N (the most accurate, the smallest among equals):
    (accuracy difference in points, mean tokens as a fraction of that N, that N)."""
    rows = [r for r in results if r["model"] == model]
    fixed = [r for r in rows if r["policy"] == "fixed"]
    best = max(fixed, key=lambda r: (r["accuracy"], -r["num_vision_tokens"]))
    adaptive = next(r for r in rows if r["policy"] == "adaptive")
    return (100 * (adaptive["accuracy"] - best["accuracy"]),
            adaptive["mean_vision_tokens"] / best["mean_vision_tokens"], best["num_vision_tokens"])


def adaptive_table(report):
    """A caption (the ladder, each model's threshold and where it came from, the goal check) and
    two tables: accuracy and mean vision tokens per question type, a row per model and policy,
    with the total prefill (every try included)."""
    results = report["results"]
    models = list(dict.fromkeys(r["model"] for r in results))
    lines = [f"Ladder {', '.join(map(str, report['ladder']))} on {results[0]['samples']} samples of "
             f"{report['shards']}; mean vision tokens are over the questions with an image. adaptive: the "
             f"smallest N of the ladder whose answer's probability reaches the threshold (the last N otherwise); "
             f"oracle: the smallest N that answers right (the smallest when none does).\n"]
    for model in models:
        adaptive = next(r for r in results if r["model"] == model and r["policy"] == "adaptive")
        calibration = report["calibration"].get(model)
        source = (f"calibrated on {calibration['samples']} samples of {report['calibration_shards']} (fewest mean "
                  f"tokens within {100 * calibration['max_drop']:.1f} points of the best fixed N there, N="
                  f"{calibration['best_fixed_tokens']})" if calibration else "given")
        difference, fraction, best = goal_check(results, model)
        lines.append(f"- {model}: threshold {adaptive['threshold']:.4g}, {source}. Against the best fixed N here "
                     f"(N={best}): {difference:+.1f} points at {100 * fraction:.0f}% of its vision tokens; "
                     f"{adaptive['tries_per_image']:.2f} tries per image.")
    types = sorted({t for r in results for t in r["accuracy_by_type"]})
    counts = {t: max(r["samples_by_type"].get(t, 0) for r in results) for t in types}
    for title, key, overall, form in (("accuracy", "accuracy_by_type", "accuracy", "{:.3f}"),
                                      ("mean vision tokens", "mean_vision_tokens_by_type", "mean_vision_tokens",
                                       "{:.1f}")):
        header = ["model", "policy", title, *(f"{t} (n={counts[t]})" for t in types)]
        header += ["prefill total s"] if key == "accuracy_by_type" else []
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in results:
            policy = f"fixed N={r['num_vision_tokens']}" if r["policy"] == "fixed" else r["policy"]
            cells = [r["model"], policy, "-" if r[overall] is None else form.format(r[overall]),
                     *(form.format(r[key][t]) if t in r[key] else "-" for t in types)]
            if key == "accuracy_by_type":
                cells.append("-" if r["policy"] == "oracle" else f"{r['prefill_total_s']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_adaptive(report, path):
    """Accuracy against mean vision tokens per model: the fixed counts (a line), the adaptive
    policy at its threshold, the oracle, and the policy at other thresholds read off the fixed
    counts' answers (dotted: the plotted split's own, not a calibration)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from pipeline.eval.adaptive_study import ladder_arrays, simulate

    results, ladder = report["results"], report["ladder"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, model in zip(colours * 10, dict.fromkeys(r["model"] for r in results)):
        rows = {r["policy"]: r for r in results if r["model"] == model and r["policy"] != "fixed"}
        fixed = [r for r in results if r["model"] == model and r["policy"] == "fixed"]
        ax.plot([r["mean_vision_tokens"] for r in fixed], [r["accuracy"] for r in fixed], "-o", color=colour,
                label=f"{model}: fixed N")
        arrays = ladder_arrays(fixed, ladder)
        sweep = [simulate(arrays, ladder, t) for t in np.linspace(0, 1, 41)]
        ax.plot([c["mean_vision_tokens"] for c in sweep], [c["accuracy"] for c in sweep], ":", color=colour,
                label=f"{model}: thresholds 0-1 (read off fixed N)")
        ax.plot(rows["adaptive"]["mean_vision_tokens"], rows["adaptive"]["accuracy"], "*", markersize=14,
                color=colour, label=f"{model}: adaptive (threshold {rows['adaptive']['threshold']:.3g})")
        ax.plot(rows["oracle"]["mean_vision_tokens"], rows["oracle"]["accuracy"], "D", color=colour,
                markerfacecolor="none", label=f"{model}: oracle")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ladder, [str(n) for n in ladder])
    ax.set_xlabel("mean vision tokens per image question")
    ax.set_ylabel("exact-match accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
