"""The pruning report: dense vs pruned accuracy, params, FLOPs, latency; the dimension plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitrim.fsutil import atomic_path, write_json, write_text
from vitrim.models.config import ViTConfig
from vitrim.report import format_table, human


def dimension_plan(cfg: ViTConfig) -> list[dict[str, Any]]:
    return [{"block": i, "heads": d.heads, "qk_dim": d.qk_dim, "v_dim": d.v_dim, "mlp_dim": d.mlp_dim,
             "attention": d.attention, "mlp": d.mlp} for i, d in enumerate(cfg.blocks)]


def comparison_rows(report: dict[str, Any]) -> list[list[str]]:
    d, p = report["dense"], report["pruned"]
    rows = []
    if d.get("accuracy") is not None:
        rows.append(["top-1 accuracy", f"{d['accuracy'] * 100:.2f}%", f"{p['accuracy'] * 100:.2f}%",
                     f"{(p['accuracy'] - d['accuracy']) * 100:+.2f} pt"])
    rows.append(["params", human(d["params"]), human(p["params"]), f"{p['params'] / d['params']:.3f}x"])
    rows.append(["FLOPs / image", human(d["flops"]), human(p["flops"]), f"{p['flops'] / d['flops']:.3f}x"])
    for batch, lat in d["latency"].items():
        pl = p["latency"][batch]
        rows.append([f"latency b={batch} (ms)", _latency(lat), _latency(pl),
                     f"{lat['median_ms'] / pl['median_ms']:.2f}x faster"])
    return rows


def _latency(stats: dict[str, Any]) -> str:
    """``median (p10-p90)``, with ``*`` when the figure is flagged unstable."""
    text = f"{stats['median_ms']:.2f}"
    if "p10_ms" in stats:
        text += f" ({stats['p10_ms']:.2f}-{stats['p90_ms']:.2f})"
    return text + ("*" if stats.get("stable") is False else "")


def summary_table(report: dict[str, Any]) -> str:
    """Dense vs pruned; latency as median (p10-p90) ms, ``*`` and a warning line when unstable."""
    from vitrim.bench.latency import unstable_warning

    table = format_table(comparison_rows(report), ["", "dense", "pruned", "ratio"])
    return table + unstable_warning((key, batch, stats) for key in ("dense", "pruned")
                                    for batch, stats in report[key]["latency"].items())


def plan_table(dense: ViTConfig, pruned: ViTConfig) -> str:
    rows = []
    for i, (a, b) in enumerate(zip(dense.blocks, pruned.blocks)):
        def cell(old, new, on=True):
            return f"{new}/{old}" if on else f"removed/{old}"
        rows.append([f"block {i}", cell(a.heads, b.heads, b.attention), cell(a.qk_dim, b.qk_dim, b.attention),
                     cell(a.v_dim, b.v_dim, b.attention), cell(a.mlp_dim, b.mlp_dim, b.mlp)])
    table = format_table(rows, ["", "heads", "qk/head", "v/head", "MLP"])
    return f"{table}\nembedding: {pruned.embed_dim}/{dense.embed_dim}"


def measured_text(report: dict[str, Any]) -> str:
    """`` (measured: 0.497 of dense)`` when a latency budget timed the built model, else nothing."""
    measured = (report.get("steps") or [{}])[-1].get("measured_ratio")
    return "" if measured is None else f" by the table (measured: {measured:.3f} of dense)"


def markdown(report: dict[str, Any], dense: ViTConfig, pruned: ViTConfig) -> str:
    lines = [f"# vitrim pruning report: {report['model']}", "",
             f"Target `{report['config']['target']}`, saliency `{report['config']['saliency']}`, "
             f"recovery `{report['config']['recover']}`, {report['config']['steps']} step(s); "
             f"{report['metric']} kept: {report['kept_ratio']:.4f}{measured_text(report)}.", "", "```",
             summary_table(report), "```", "", "## Dimension plan (kept/dense)", "", "```",
             plan_table(dense, pruned), "```", ""]
    if report.get("plot"):
        lines += [f"![dimension plan]({report['plot']})", ""]
    return "\n".join(lines)


def plot_plan(dense: ViTConfig, pruned: ViTConfig, path: Path) -> bool:
    """Bar chart of kept fraction per block and structure; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = [("heads", "heads"), ("qk_dim", "qk/head"), ("v_dim", "v/head"), ("mlp_dim", "MLP")]
    depth = dense.depth
    fig, ax = plt.subplots(figsize=(max(6, depth * 0.9), 3.6))
    width = 0.8 / len(kinds)
    for k, (attr, label) in enumerate(kinds):
        values = [getattr(b, attr) / max(1, getattr(a, attr)) for a, b in zip(dense.blocks, pruned.blocks)]
        ax.bar([i + (k - 1.5) * width for i in range(depth)], values, width, label=label)
    ax.set_xticks(range(depth), [f"block {i}" for i in range(depth)])
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Dimension plan (embedding {pruned.embed_dim}/{dense.embed_dim})")
    ax.legend(ncols=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def write_report(directory: Path, report: dict[str, Any], dense: ViTConfig, pruned: ViTConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if plot_plan(dense, pruned, directory / "plan.png"):
        report["plot"] = "plan.png"
    write_json(directory / "report.json", report)
    write_text(directory / "report.md", markdown(report, dense, pruned))
