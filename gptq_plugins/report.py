"""The quantization report: per-layer rows, a per-block summary line, and a plot."""

from __future__ import annotations

from pathlib import Path

from gptq_plugins.cpu_features import cpu_features


def summarize(rows: list[dict]) -> dict:
    """Aggregate figures over layer rows (means of relative errors, totals of time)."""
    if not rows:
        return {"layers": 0}
    n = len(rows)
    return {
        "layers": n,
        "mean_relative_error": sum(r["relative_error"] for r in rows) / n,
        "mean_rtn_relative_error": sum(r["rtn_relative_error"] for r in rows) / n,
        "max_relative_error": max(r["relative_error"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
        "fallbacks": [r["name"] for r in rows if r.get("fallback")],
        "damping_escalated": [r["name"] for r in rows if r.get("damping_escalated")],
    }


def run_report(config, layout, rows: list[dict], device) -> dict:
    """The report: options (machine-dependent ones as they ran), where it ran, summary, per-layer rows."""
    machine = {"device": str(device), "cpu": cpu_features().as_dict()}
    return {"config": config.to_dict(), "layout": layout.name, "machine": machine, "summary": summarize(rows),
            "layers": rows}


def plot_report(report: dict, path: Path) -> None:
    """Per-layer relative output error of GPTQ against round-to-nearest, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(rows)), 3.5), dpi=100)
    xs = range(len(rows))
    ax.plot(xs, [r["rtn_relative_error"] for r in rows], "o-", ms=3, label="round-to-nearest")
    ax.plot(xs, [r["relative_error"] for r in rows], "o-", ms=3, label="GPTQ")
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("relative output error")
    cfg = report.get("config", {})
    ax.set_title(f"{cfg.get('bits', '?')}-bit, group {cfg.get('group_size', '?')}: per-layer error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
