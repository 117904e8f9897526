"""Tables and plots of a sweep: summary.{csv,md,tex} with pandas, Pareto / latency / sample-grid plots
with matplotlib (png and pdf), from the merged records and the metrics of `utils/sweep.py`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# Which way is better, and how each metric is labelled in tables and plots.
QUALITY_METRICS = {"fid": ("lower", "FID"), "lpips": ("lower", "LPIPS"), "psnr": ("higher", "PSNR (dB)"),
                   "ssim": ("higher", "SSIM"), "clip": ("higher", "CLIP score"),
                   "image_reward": ("higher", "ImageReward")}
PER_IMAGE_METRICS = ("lpips", "psnr", "ssim", "clip", "image_reward")  # FID only exists per set
STAGES = ("prompt_encoding", "denoising", "decoding", "postprocessing")


def variant_table(records: list[dict[str, Any]], variants: list[str], baseline: str, status: dict[str, str],
                  metrics: list[str], per_image: dict[str, dict], per_set: dict[str, dict]) -> pd.DataFrame:
    """One row per variant, numeric (the CSV): mean and std where per-image values exist."""
    df = pd.DataFrame(records)
    if per_image:
        df = df.join(pd.DataFrame.from_dict(per_image, orient="index"), on="key")
    rows = []
    for name in variants:
        sub = df[df["variant"] == name] if len(df) else df
        row: dict[str, Any] = {"variant": name, "status": status.get(name, "missing"), "images": len(sub)}
        for col in ("latency_s", "denoise_s"):
            values = _numeric(sub, col)
            row[f"{col}_mean"], row[f"{col}_std"] = values.mean(), values.std(ddof=1)  # sample std, as utils.metrics
        for col in ("full_steps", "forecast_steps"):
            row[col] = _numeric(sub, col).mean()
        row["tflops_per_image"] = _numeric(sub, "flops").mean() / 1e12
        row["peak_memory_gb"] = _numeric(sub, "peak_memory_gb").max()
        for m in metrics:
            if m == "fid":
                row["fid"] = per_set.get(name, {}).get("fid", math.nan)
                if any("fid_reference" in v for v in per_set.values()):  # vs real images, when configured
                    row["fid_reference"] = per_set.get(name, {}).get("fid_reference", math.nan)
            else:
                values = _numeric(sub, m).dropna()
                row[f"{m}_mean"], row[f"{m}_std"] = values.mean(), values.std(ddof=1)
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table.loc[table["variant"] == baseline].iloc[0]
    table["speedup"] = base["latency_s_mean"] / table["latency_s_mean"]
    table["flops_speedup"] = base["tflops_per_image"] / table["tflops_per_image"]
    first = ["variant", "status", "images", "latency_s_mean", "latency_s_std", "speedup", "flops_speedup",
             "denoise_s_mean", "denoise_s_std", "full_steps", "forecast_steps", "tflops_per_image"]
    return table[first + [c for c in table.columns if c not in first]]


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    """The column as floats (None -> NaN); an all-NaN series when no record has it."""
    return pd.to_numeric(df[column], errors="coerce") if column in df else pd.Series(dtype=float)


def _mean_std(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "—"
    if pd.isna(std) or std == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def formatted_table(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The human table (markdown and LaTeX): mean ± std strings, one column per quantity."""
    digits = {"lpips": 3, "psnr": 2, "ssim": 3, "clip": 2, "image_reward": 3}
    out = pd.DataFrame({"Variant": table["variant"], "Status": table["status"], "Images": table["images"]})
    out["Latency (s)"] = [_mean_std(m, s, 3) for m, s in zip(table["latency_s_mean"], table["latency_s_std"])]
    out["Speedup"] = [f"{v:.2f}×" if pd.notna(v) else "—" for v in table["speedup"]]
    out["FLOPs speedup"] = [f"{v:.2f}×" if pd.notna(v) else "—" for v in table["flops_speedup"]]
    out["Denoise (s)"] = [_mean_std(m, s, 3) for m, s in zip(table["denoise_s_mean"], table["denoise_s_std"])]
    out["Full / forecast steps"] = [f"{f:.1f} / {c:.1f}" if pd.notna(f) else "—"
                                    for f, c in zip(table["full_steps"], table["forecast_steps"])]
    for m in metrics:
        label = QUALITY_METRICS[m][1]
        if m == "fid":
            out[label] = [f"{v:.2f}" if pd.notna(v) else "—" for v in table["fid"]]
            if "fid_reference" in table:
                out["FID vs real"] = [f"{v:.2f}" if pd.notna(v) else "—" for v in table["fid_reference"]]
        else:
            out[label] = [_mean_std(a, b, digits[m]) for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
    out["Peak memory (GB)"] = [f"{v:.1f}" if pd.notna(v) else "n/a (CPU)" for v in table["peak_memory_gb"]]
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown from a DataFrame (pandas' to_markdown would need the tabulate package)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def latex_table(df: pd.DataFrame, caption: str, label: str) -> str:
    """pandas' LaTeX with math-mode symbols, so that pdflatex needs no unicode setup."""
    symbols = {"±": "@PM@", "×": "@TIMES@", "—": "@DASH@"}  # survive escape=True, then become LaTeX
    ascii_df = df.map(lambda v: _replace_all(str(v), symbols))
    tex = ascii_df.to_latex(index=False, escape=True, caption=_replace_all(caption, symbols).replace("_", "\\_"),
                            label=label)
    return _replace_all(tex, {"@PM@": "$\\pm$", "@TIMES@": "$\\times$", "@DASH@": "--"})


def _replace_all(text: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        text = text.replace(old, new)
    return text


# --- plots -----------------------------------------------------------------------------------------

def _save(fig, output_dir: Path, stem: str) -> list[Path]:
    paths = [output_dir / f"{stem}.png", output_dir / f"{stem}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def pareto_front(points: pd.DataFrame, column: str, direction: str) -> list[str]:
    """Variants that no other variant beats: none is at least as fast and strictly better in `column`."""
    better = (lambda a, b: a < b) if direction == "lower" else (lambda a, b: a > b)
    return [p["variant"] for _, p in points.iterrows()
            if not any(o["speedup"] >= p["speedup"] and better(o[column], p[column]) for _, o in points.iterrows())]


def pareto_plot(table: pd.DataFrame, metric: str, baseline: str, output_dir: Path) -> list[Path]:
    """Speedup (x) against one quality metric (y); the Pareto-optimal variants are joined by a line."""
    direction, label = QUALITY_METRICS[metric]
    column = "fid" if metric == "fid" else f"{metric}_mean"
    points = table[["variant", "speedup", column]].dropna()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axvline(1.0, color="grey", lw=0.8, ls=":", label=f"baseline ({baseline})")
    ax.scatter(points["speedup"], points[column], color="tab:blue", zorder=3)
    for _, p in points.iterrows():
        ax.annotate(p["variant"], (p["speedup"], p[column]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier = points[points["variant"].isin(pareto_front(points, column, direction))].sort_values("speedup")
    if len(frontier) > 1:
        ax.plot(frontier["speedup"], frontier[column], color="tab:red", lw=1, label="Pareto front", zorder=2)
    ax.set_xlabel("speedup over the baseline (latency)")
    ax.set_ylabel(f"{label} ({direction} is better)")
    ax.set_title(f"Speed vs quality: {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, output_dir, f"pareto_{metric}")


def latency_breakdown_plot(records: list[dict[str, Any]], variants: list[str], output_dir: Path) -> list[Path]:
    """Mean seconds per stage of one image, per variant (stacked bars); 'other' is latency minus stages."""
    rows = []
    for name in variants:
        recs = [r for r in records if r["variant"] == name]
        if not recs:
            continue
        stage = {s: sum((r["stages_s"].get(s) or 0.0) for r in recs) / len(recs) for s in STAGES}
        stage["other"] = max(0.0, sum(r["latency_s"] for r in recs) / len(recs) - sum(stage.values()))
        rows.append({"variant": name, **stage})
    df = pd.DataFrame(rows).set_index("variant") if rows else pd.DataFrame(columns=[*STAGES, "other"])
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * max(len(df), 2) + 1.2))
    if len(df):
        df.plot.barh(stacked=True, ax=ax, width=0.7)
        ax.invert_yaxis()
    ax.set_xlabel("seconds per image (mean)")
    ax.set_ylabel("")
    ax.set_title("Latency breakdown")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, output_dir, "latency_breakdown")


def sample_grid_plot(records: list[dict[str, Any]], variants: list[str], output_dir: Path, rows: int = 3) -> list[Path]:
    """Rows: the first (prompt, seed) pairs that every variant with images has; columns: variants."""
    from PIL import Image

    by_variant: dict[str, dict[tuple, dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], {})[(r["prompt_index"], r["seed"])] = r
    columns = [v for v in variants if v in by_variant]
    common = sorted(set.intersection(*(set(by_variant[v]) for v in columns))) if columns else []
    pairs = common[:rows]
    fig, axes = plt.subplots(max(len(pairs), 1), max(len(columns), 1), squeeze=False,
                             figsize=(1.9 * max(len(columns), 1), 2.1 * max(len(pairs), 1)))
    for ax in axes.flat:
        ax.axis("off")
    for i, pair in enumerate(pairs):
        for j, name in enumerate(columns):
            rec = by_variant[name][pair]
            with Image.open(output_dir / rec["image"]) as im:
                axes[i][j].imshow(im.convert("RGB"))
            if i == 0:
                axes[i][j].set_title(name, fontsize=9)
        prompt = by_variant[columns[0]][pair]["prompt"]
        axes[i][0].text(-0.05, 0.5, f"{prompt[:40]}{'…' if len(prompt) > 40 else ''}\nseed {pair[1]}", fontsize=6,
                        ha="right", va="center", transform=axes[i][0].transAxes, wrap=True)
    fig.suptitle("Same prompt and seed across variants", fontsize=10)
    return _save(fig, output_dir, "samples_grid")


# --- the whole report ------------------------------------------------------------------------------

def write_report(output_dir: Path, title: str, description: str, records: list[dict[str, Any]], variants: list[str],
                 baseline: str, status: dict[str, str], metrics: list[str], per_image: dict[str, dict],
                 per_set: dict[str, dict], pareto_metrics: list[str] | None = None, grid_rows: int = 3,
                 timing: dict[str, Any] | None = None, interval1: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write summary.csv/.md/.tex and every plot into output_dir; returns the written paths by name."""
    output_dir = Path(output_dir)
    table = variant_table(records, variants, baseline, status, metrics, per_image, per_set)
    human = formatted_table(table, metrics)
    written = {"csv": output_dir / "summary.csv", "md": output_dir / "summary.md", "tex": output_dir / "summary.tex"}
    table.to_csv(written["csv"], index=False)
    written["tex"].write_text(latex_table(human, caption=f"{title}: speed and quality against {baseline}",
                                          label=f"tab:{title}"))

    plots = []
    for m in pareto_metrics if pareto_metrics is not None else [m for m in metrics if m in QUALITY_METRICS]:
        plots += pareto_plot(table, m, baseline, output_dir)
    plots += latency_breakdown_plot(records, variants, output_dir)
    plots += sample_grid_plot(records, variants, output_dir, rows=grid_rows)
    for p in plots:
        written[p.name] = p

    md = [f"# Ablation: {title}\n", description.strip() + "\n" if description.strip() else "",
          f"Baseline: `{baseline}`. Speedup is the baseline's mean latency over the variant's; FLOPs speedup the "
          f"same for transformer FLOPs. PSNR/SSIM/LPIPS/FID compare each image with the baseline image of the same "
          f"prompt and seed (so the baseline has none); CLIP and ImageReward score the prompt. Values are mean ± std "
          f"over images.\n", markdown_table(human)]
    if timing:
        md += ["\n## Sweep time\n", markdown_table(pd.DataFrame([{k: (f"{v:.2f}" if isinstance(v, float) else v)
                                                                   for k, v in timing.items()}]))]
    if interval1 is not None:
        md += ["\n## interval=1 three-way check: " + interval1.get("status", "?") + "\n"]
        if interval1.get("reason"):
            md.append(interval1["reason"] + "\n")
        if interval1.get("table_md"):
            md.append(interval1["table_md"] + "\n")
        elif interval1.get("rows"):
            md.append(markdown_table(pd.DataFrame(interval1["rows"])))
        extra = {k: v for k, v in interval1.items() if k not in ("rows", "table_md", "status", "reason", "passed")}
        if extra:
            md.append("\n```json\n" + json.dumps(extra, indent=2, default=str) + "\n```\n")
    md += ["\n## Plots\n"] + [f"![{p.stem}]({p.name})\n" for p in plots if p.suffix == ".png"]
    written["md"].write_text("\n".join(md))
    return written
