"""Pictures of reports (matplotlib, no display needed). Each function returns a Figure."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

_LAYER = re.compile(r"\.(\d+)\.(.+)$")


def _integers(ax: Any, axis: str = "x") -> None:
    """Whole-number ticks on an axis that counts things (blocks, heads, steps, waves)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def baseline_figure(report: dict[str, Any]) -> Figure:
    """Three panels: explained variance of the top-k ranks per layer and matrix kind, the
    mean explained-variance curve per matrix kind, and a table of the headline numbers."""
    spectra = report["spectra"]
    by_kind: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for name, spec in spectra.items():
        match = _LAYER.search(name)
        if match:
            by_kind[match.group(2)][int(match.group(1))] = spec
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for kind, layers in sorted(by_kind.items()):
        idx = sorted(layers)
        ax.plot(idx, [layers[i]["explained"][-1] for i in idx], marker=".", label=kind)
    k = len(next(iter(spectra.values()))["explained"])
    ax.set(
        xlabel="decoder block", ylabel=f"energy in top {k} singular values", title="Spectral concentration per layer"
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _integers(ax)
    ax = axes[1]
    for kind, layers in sorted(by_kind.items()):
        curves = [spec["explained"] for spec in layers.values()]
        mean = [sum(c[r] for c in curves) / len(curves) for r in range(min(map(len, curves)))]
        ax.plot(range(1, len(mean) + 1), mean, label=kind)
    ax.set(xlabel="rank", ylabel="explained variance (mean over blocks)", title="Explained-variance curves")
    ax.grid(alpha=0.3)
    _integers(ax)
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.axis("off")
    rows = [[key, value] for key, value in headline(report).items()]
    table = ax.table(cellText=rows, colLabels=["baseline", "value"], loc="center", cellLoc="left")
    table.scale(1, 1.4)
    ax.set_title(report.get("model_name", "model"))
    fig.tight_layout()
    return fig


def headline(report: dict[str, Any]) -> dict[str, str]:
    """The numbers a person looks for first, formatted."""
    q, s, sp = report["quality"], report["size"], report["speed"]
    rows = {
        "perplexity (validation)": f"{q['validation']['ppl']:.3f}",
        "perplexity (test)": f"{q['test']['ppl']:.3f}",
        "parameters": f"{s['params']:,}",
        "weights on disk": f"{s['bytes'] / 2**20:,.1f} MiB" if s["bytes"] else "n/a",
        "decode": f"{sp['decode_tokens_per_s']:.1f} tok/s ({sp['device']}, {sp['threads']} threads)",
        "prefill": f"{sp['prefill_tokens_per_s']:.0f} tok/s",
    }
    for name, task in report["tasks"].items():
        score = task.get("accuracy", task.get("exact_match"))
        rows[f"task {name}"] = f"{score:.3f} (n={task['n']})"
    return rows


def profile_figure(summary: dict[str, Any]) -> Figure:
    """Heat-map of activation frequency (block x Linear), block influence, and head
    importance (block x head)."""
    import numpy as np

    freq = summary["mean_frequency"]
    kinds = sorted({_LAYER.search(k).group(2) for k in freq if _LAYER.search(k)})
    blocks = len(summary["block_influence"])
    grid = np.full((len(kinds), blocks), np.nan)
    for key, value in freq.items():
        match = _LAYER.search(key)
        if match:
            grid[kinds.index(match.group(2)), int(match.group(1))] = value
    heads = summary["head_importance"]
    head_grid = np.array([heads[k] for k in sorted(heads, key=lambda k: int(k.rsplit(".", 1)[1]))])
    clusters = summary.get("clusters")
    panels = 4 if clusters else 3
    ratios = [3, 2, 3, 3][:panels]
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), gridspec_kw={"width_ratios": ratios})
    image = axes[0].imshow(grid, aspect="auto", cmap="viridis", vmax=1)
    title = f"Activation frequency (share of tokens with |x| > {summary.get('frequency_eps', 1e-3):g})"
    axes[0].set(yticks=range(len(kinds)), yticklabels=kinds, xlabel="decoder block", title=title)
    fig.colorbar(image, ax=axes[0])
    axes[1].bar(range(blocks), summary["block_influence"], color="tab:red")
    axes[1].set(xlabel="decoder block", ylabel="1 - cos(in, out)", title="Block influence")
    image = axes[2].imshow(head_grid.T, aspect="auto", cmap="magma")
    axes[2].set(xlabel="decoder block", ylabel="query head", title="Head importance (||X_o|| * ||W_o||)")
    fig.colorbar(image, ax=axes[2])
    _integers(axes[2], "y")
    if clusters:
        _clusters_panel(axes[3], clusters)
    for ax in axes:
        _integers(ax)
    fig.tight_layout()
    return fig


def _clusters_panel(ax: Any, clusters: dict[str, Any]) -> None:
    """Each block's MLP-channel clusters as a stacked bar: a segment per cluster, as tall
    as its size, coloured by its usage relative to the block's busiest cluster."""
    import numpy as np

    layers = sorted(clusters["layers"], key=lambda k: int(k.rsplit(".", 1)[1]))
    cmap = plt.get_cmap("plasma")
    for x, key in enumerate(layers):
        sizes, usage = clusters["layers"][key]["sizes"], np.array(clusters["layers"][key]["usage"])
        share = usage / max(usage.max(), 1e-12)
        bottom = 0
        for c in np.argsort(-usage):
            ax.bar(x, sizes[c], bottom=bottom, color=cmap(share[c]), edgecolor="white", linewidth=0.3)
            bottom += sizes[c]
    ax.set(
        xlabel="decoder block",
        ylabel="MLP channels",
        title=f"{clusters['count']} {clusters['method']} clusters per block (colour: usage / block's max)",
    )
    plt.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax)


_DECISION_STYLE = {
    "start": ("black", "o"),
    "kept": ("tab:green", "o"),
    "strike": ("tab:orange", "X"),
    "rolling back": ("tab:purple", "v"),
    "reverted": ("tab:red", "s"),
    "skipped": ("lightgray", "."),
}


def decay_figure(rows: list[dict[str, Any]], dense_ppl: float) -> Figure:
    """The decay curve: perplexity and KL to the dense model against sparsity, one point
    per wave (numbered), coloured by the gate's decision, in wave order."""
    clustered = [r for r in rows if r.get("clusters")]
    fig, axes = plt.subplots(1, 3 if clustered else 2, figsize=(19 if clustered else 13, 4.8))
    shown = [r for r in rows if r["decision"] != "skipped"]
    for ax, key, label in ((axes[0], "ppl", "validation perplexity"), (axes[1], "kl", "KL to dense (nats/token)")):
        ax.plot([100 * r["sparsity"] for r in shown], [r[key] for r in shown], color="gray", alpha=0.5, zorder=1)
        seen = set()
        for r in shown:
            color, marker = _DECISION_STYLE.get(r["decision"], ("black", "o"))
            ax.scatter(
                100 * r["sparsity"],
                r[key],
                color=color,
                marker=marker,
                s=60,
                zorder=2,
                label=None if r["decision"] in seen else r["decision"],
            )
            seen.add(r["decision"])
            ax.annotate(
                str(r["wave"]), (100 * r["sparsity"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        ax.set(xlabel="sparsity of the block Linears (%)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].axhline(dense_ppl, color="black", linestyle="--", linewidth=0.8, label=f"dense {dense_ppl:.2f}")
    axes[0].set_title("Decay waves: perplexity (numbers: wave)")
    axes[1].set_title("Decay waves: KL divergence from the dense model")
    axes[0].legend(fontsize=8)
    if clustered:
        _cluster_factors_panel(axes[2], clustered)
    fig.tight_layout()
    return fig


def _cluster_factors_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Cluster-aware decay: the spread of the clusters' share factors in each wave (every
    block's clusters together), and how many clusters spiked."""
    factors = [[v for f in r["clusters"]["factors"].values() for v in f] for r in rows]
    waves = [r["wave"] for r in rows]
    ax.boxplot(factors, positions=waves, widths=0.5, showfliers=True)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    for wave, r, values in zip(waves, rows, factors, strict=True):
        spiked = sum(len(c) for c in r["clusters"].get("spiked", {}).values())
        if spiked:
            ax.annotate(f"{spiked} spiked", (wave, max(values)), textcoords="offset points", xytext=(0, 6), fontsize=7)
    ax.set(
        xlabel="wave",
        ylabel="cluster share / layer share",
        title="Cluster-aware decay: each cluster's share factor per wave",
    )
    ax.grid(alpha=0.3)
    _integers(ax)


def heal_figure(curves: dict[str, list[dict[str, float]]]) -> Figure:
    """Healing curves: training loss (left) and validation perplexity of the adapted model
    (right) against optimizer steps, one line per healing (``wave 3``, ``final``)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve in curves.items():
        steps = [p["step"] for p in curve if "loss" in p]
        if steps:
            axes[0].plot(steps, [p["loss"] for p in curve if "loss" in p], label=label, lw=1)
        points = [(p["step"], p["val_ppl"]) for p in curve if p.get("val_ppl") is not None]
        if points:
            axes[1].plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="Healing loss")
    axes[1].set(xlabel="optimizer step", ylabel="validation perplexity (curve blocks)", title="Healing perplexity")
    for ax in axes:
        ax.grid(alpha=0.3)
        _integers(ax)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


_MODULE_COLORS = {
    "q_proj": "tab:blue",
    "k_proj": "tab:cyan",
    "v_proj": "tab:purple",
    "o_proj": "tab:pink",
    "gate_proj": "tab:orange",
    "up_proj": "tab:red",
    "down_proj": "tab:brown",
}


def quantize_figure(layers: list[dict[str, Any]], title: str) -> Figure:
    """Bits per weight of every block Linear (scales included), by block and module, with
    the model's average; and, when given, each block's loss rise with only it quantized."""
    stress = [r for r in layers if r.get("loss_rise") is not None]
    fig, axes = plt.subplots(1, 2 if stress else 1, figsize=(13 if stress else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    order = list(_MODULE_COLORS)
    modules = sorted({r["module"] for r in layers}, key=lambda m: order.index(m) if m in order else len(order))
    width = 0.8 / max(len(modules), 1)
    for k, module in enumerate(modules):
        rows = [r for r in layers if r["module"] == module]
        ax.bar(
            [r["block"] + (k - len(modules) / 2) * width for r in rows],
            [r["bits_per_weight"] for r in rows],
            width=width,
            color=_MODULE_COLORS.get(module, "gray"),
            label=module,
        )
    total = sum(r["params"] for r in layers)
    average = sum(r["bits_per_weight"] * r["params"] for r in layers) / max(total, 1)
    ax.axhline(average, color="black", linestyle="--", linewidth=0.8, label=f"average {average:.3f}")
    ax.set(xlabel="block", ylabel="bits per weight (scales included)", title=title)
    # below the bars, never over them
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    _integers(ax)
    if stress:
        blocks = sorted({r["block"] for r in stress})
        rise = {r["block"]: r["loss_rise"] for r in stress}
        axes[0][1].bar(blocks, [100 * rise[b] for b in blocks], color="tab:gray")
        axes[0][1].set(
            xlabel="block", ylabel="validation loss rise (%)", title="Stress: loss with only this block quantized"
        )
        axes[0][1].grid(alpha=0.3, axis="y")
        _integers(axes[0][1])
    fig.tight_layout()
    return fig


def timeline_figure(timeline: dict[str, Any]) -> Figure:
    """Where a run's time went: each node as a bar from its start to its end, one row per
    node (the slowest named), coloured by stage; and the seconds of each stage."""
    nodes = [{"node": name, **node} for name, node in timeline["nodes"].items()]
    stages = list(timeline["stage_seconds"])
    colours = {stage: plt.get_cmap("tab10")(i % 10) for i, stage in enumerate(stages)}
    fig, (gantt, bars) = plt.subplots(
        1, 2, figsize=(13, max(3.5, 0.12 * len(nodes) + 1.5)), gridspec_kw={"width_ratios": [3, 1]}
    )
    for row, node in enumerate(nodes):
        gantt.barh(row, max(node["seconds"], 0.5), left=node["start_seconds"], color=colours[node["stage"]])
    slowest = sorted(range(len(nodes)), key=lambda i: -nodes[i]["seconds"])[:20]
    gantt.set_yticks(slowest, [f"{nodes[i]['node']} ({nodes[i]['seconds']:.0f} s)" for i in slowest], fontsize=7)
    gantt.invert_yaxis()
    minutes = timeline["total_seconds"] / 60
    gantt.set(xlabel="seconds since the run started", title=f"timeline: {minutes:.1f} min in all")
    gantt.grid(axis="x", alpha=0.3)
    seconds = [timeline["stage_seconds"][s] for s in stages]
    bars.barh(stages, seconds, color=[colours[s] for s in stages])
    for i, value in enumerate(seconds):
        bars.annotate(f"{value:.0f} s", (value, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set(xlabel="seconds", title="by stage")
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure, dpi: int = 110, tight: bool = False) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()
