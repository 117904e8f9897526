"""Tables and plots of a sweep: summary.{csv,md,tex} with pandas, Pareto / latency / sample-grid plots
with matplotlib (png and pdf), from the merged records and the metrics of `utils/sweep.py`.

What the numbers cannot carry is said beside them: metrics of random-init metric models and images of a
random-weight pipeline are labelled as such, and a variant whose latencies spread widely (a busy host)
is marked noisy in the tables and plots. Every file is written whole and renamed into place."""

from __future__ import annotations

import json
import math
import os
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
MODEL_METRICS = ("fid", "lpips", "clip", "image_reward")  # computed by a network (PSNR and SSIM from pixels alone)
STAGES = ("prompt_encoding", "denoising", "decoding", "postprocessing")
# A variant's timing is noisy when its latencies' sample std exceeds this fraction of their mean. Repeated
# generations of one variant on a quiet machine spread by a few percent; a busy CPU made it 65%.
NOISY_SPREAD = 0.25
RANDOM_INIT = "random-init"


def variant_table(records: list[dict[str, Any]], variants: list[str], baseline: str, status: dict[str, str],
                  metrics: list[str], per_image: dict[str, dict], per_set: dict[str, dict],
                  metrics_random_init: bool = False, clip_model: str = "ViT-L-14") -> pd.DataFrame:
    """One row per variant, numeric (the CSV): mean and std where per-image values exist; latency_cv (std / mean)
    and timing_noisy (latency_cv above NOISY_SPREAD); metric_models ('random-init' or 'pretrained') when a
    metric comes from a network."""
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
    table["latency_cv"] = table["latency_s_std"] / table["latency_s_mean"]
    table["timing_noisy"] = table["latency_cv"] > NOISY_SPREAD  # NaN (one image or none) is not flagged
    # a speedup is a ratio of two timings: noisy when either is
    table["speedup_noisy"] = table["timing_noisy"] | bool(table.loc[table["variant"] == baseline, "timing_noisy"].any())
    if any(m in MODEL_METRICS for m in metrics):
        table["metric_models"] = RANDOM_INIT if metrics_random_init else "pretrained"
    if "clip" in metrics:
        table["clip_model"] = clip_model
    first = ["variant", "status", "images", "latency_s_mean", "latency_s_std", "latency_cv", "timing_noisy",
             "speedup", "speedup_noisy", "flops_speedup", "denoise_s_mean", "denoise_s_std", "full_steps",
             "forecast_steps", "tflops_per_image"]
    return table[first + [c for c in table.columns if c not in first]]


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    """The column as floats (None -> NaN); an all-NaN series when no record has it."""
    return pd.to_numeric(df[column], errors="coerce") if column in df else pd.Series(dtype=float)


def _number(value: float, digits: int) -> str:
    """`digits` decimals, or three significant digits where the decimals would show fewer than two (an LPIPS of
    1.2e-05 is not 0.000)."""
    if value != 0 and abs(value) < 10.0 ** (1 - digits):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _mean_std(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "—"
    if pd.isna(std) or std == 0:
        return _number(mean, digits)
    return f"{_number(mean, digits)} ± {_number(std, digits)}"


def metric_label(metric: str, random_init: bool, clip_model: str | None = None) -> str:
    label = QUALITY_METRICS[metric][1]
    if metric == "clip" and clip_model:
        label = f"{label} {clip_model}"
    return f"{label} ({RANDOM_INIT})" if random_init and metric in MODEL_METRICS else label


def formatted_table(table: pd.DataFrame, metrics: list[str], metrics_random_init: bool = False,
                    clip_model: str | None = None) -> pd.DataFrame:
    """The human table (markdown and LaTeX): mean ± std strings, one column per quantity. A noisy variant's
    latency, and a speedup with a noisy side (the variant or the baseline), say "(noisy)"; the columns of
    metrics from random-init models say so in their headers."""
    digits = {"lpips": 3, "psnr": 2, "ssim": 3, "clip": 2, "image_reward": 3}
    mark = lambda text, flagged: f"{text} (noisy)" if flagged and text != "—" else text  # noqa: E731
    out = pd.DataFrame({"Variant": table["variant"], "Status": table["status"], "Images": table["images"]})
    out["Latency (s)"] = [mark(_mean_std(m, s, 3), bool(n))
                          for m, s, n in zip(table["latency_s_mean"], table["latency_s_std"], table["timing_noisy"])]
    out["Speedup"] = [mark(f"{v:.2f}×" if pd.notna(v) else "—", bool(n))
                      for v, n in zip(table["speedup"], table["speedup_noisy"])]
    out["FLOPs speedup"] = [f"{v:.2f}×" if pd.notna(v) else "—" for v in table["flops_speedup"]]
    out["Denoise (s)"] = [_mean_std(m, s, 3) for m, s in zip(table["denoise_s_mean"], table["denoise_s_std"])]
    out["Full / forecast steps"] = [f"{f:.1f} / {c:.1f}" if pd.notna(f) else "—"
                                    for f, c in zip(table["full_steps"], table["forecast_steps"])]
    for m in metrics:
        label = metric_label(m, metrics_random_init, clip_model)
        if m == "fid":
            out[label] = [_number(v, 2) if pd.notna(v) else "—" for v in table["fid"]]
            if "fid_reference" in table:
                out[label.replace("FID", "FID vs real", 1)] = [_number(v, 2) if pd.notna(v) else "—"
                                                               for v in table["fid_reference"]]
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

def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(fig, output_dir: Path, stem: str) -> list[Path]:
    paths = [output_dir / f"{stem}.png", output_dir / f"{stem}.pdf"]
    fig.tight_layout()
    for p in paths:
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, dpi=150, format=p.suffix[1:])
        os.replace(tmp, p)
    plt.close(fig)
    return paths


def pareto_front(points: pd.DataFrame, column: str, direction: str) -> list[str]:
    """Variants that no other variant beats: none is at least as fast and strictly better in `column`."""
    better = (lambda a, b: a < b) if direction == "lower" else (lambda a, b: a > b)
    return [p["variant"] for _, p in points.iterrows()
            if not any(o["speedup"] >= p["speedup"] and better(o[column], p[column]) for _, o in points.iterrows())]


def pareto_plot(table: pd.DataFrame, metric: str, baseline: str, output_dir: Path,
                random_init: bool = False) -> list[Path]:
    """Speedup (x) against one quality metric (y); the Pareto-optimal variants are joined by a line. Noisy
    timings are marked on their points; a random-init metric model says so in the title and axis."""
    direction, label = QUALITY_METRICS[metric]
    column = "fid" if metric == "fid" else f"{metric}_mean"
    noisy = set(table.loc[table["timing_noisy"], "variant"])
    points = table[["variant", "speedup", column]].dropna()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axvline(1.0, color="grey", lw=0.8, ls=":", label=f"baseline ({baseline})")
    ax.scatter(points["speedup"], points[column], color="tab:blue", zorder=3)
    for _, p in points.iterrows():
        text = p["variant"] + (" (noisy timing)" if p["variant"] in noisy else "")
        ax.annotate(text, (p["speedup"], p[column]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier = points[points["variant"].isin(pareto_front(points, column, direction))].sort_values("speedup")
    if len(frontier) > 1:
        ax.plot(frontier["speedup"], frontier[column], color="tab:red", lw=1, label="Pareto front", zorder=2)
    ax.set_xlabel("speedup over the baseline (latency)")
    if random_init and metric in MODEL_METRICS:
        ax.set_ylabel(f"{label} of a {RANDOM_INIT} model (meaningless)")
        ax.set_title(f"Speed vs {label}: {RANDOM_INIT} metric model, values test the plumbing only", fontsize=9)
    else:
        ax.set_ylabel(f"{label} ({direction} is better)")
        ax.set_title(f"Speed vs quality: {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, output_dir, f"pareto_{metric}")


def latency_breakdown_plot(records: list[dict[str, Any]], variants: list[str], output_dir: Path,
                           noisy: set[str] | frozenset = frozenset()) -> list[Path]:
    """Mean seconds per stage of one image, per variant (stacked bars); 'other' is latency minus stages.
    Variants in `noisy` are labelled as such."""
    rows = []
    for name in variants:
        recs = [r for r in records if r["variant"] == name]
        if not recs:
            continue
        stage = {s: sum((r["stages_s"].get(s) or 0.0) for r in recs) / len(recs) for s in STAGES}
        stage["other"] = max(0.0, sum(r["latency_s"] for r in recs) / len(recs) - sum(stage.values()))
        rows.append({"variant": name + (" (noisy)" if name in noisy else ""), **stage})
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
    random_weights = any(r.get("random_weights") for r in records)
    fig.suptitle("Same prompt and seed across variants" +
                 ("\n(random-weight pipeline: the images are noise by design)" if random_weights else ""), fontsize=10)
    return _save(fig, output_dir, "samples_grid")


# --- the whole report ------------------------------------------------------------------------------

def write_report(output_dir: Path, title: str, description: str, records: list[dict[str, Any]], variants: list[str],
                 baseline: str, status: dict[str, str], metrics: list[str], per_image: dict[str, dict],
                 per_set: dict[str, dict], pareto_metrics: list[str] | None = None, grid_rows: int = 3,
                 timing: dict[str, Any] | None = None, interval1: dict[str, Any] | None = None,
                 metrics_random_init: bool = False, show_progress: bool = False,
                 clip_model: str = "ViT-L-14") -> dict[str, Path]:
    """Write summary.csv/.md/.tex and every plot into output_dir; returns the written paths by name."""
    from tqdm import tqdm

    output_dir = Path(output_dir)
    table = variant_table(records, variants, baseline, status, metrics, per_image, per_set, metrics_random_init,
                          clip_model)
    human = formatted_table(table, metrics, metrics_random_init, clip_model if "clip" in metrics else None)
    noisy = [(name, cv) for name, cv, flag in zip(table["variant"], table["latency_cv"], table["timing_noisy"]) if flag]
    written = {"csv": output_dir / "summary.csv", "md": output_dir / "summary.md", "tex": output_dir / "summary.tex"}
    caption = f"{title}: speed and quality against {baseline}"
    if metrics_random_init and any(m in MODEL_METRICS for m in metrics):
        caption += f"; {RANDOM_INIT} marks metrics of random-weight metric models (meaningless values)"
    if noisy:
        caption += "; (noisy) marks a latency spread above " + f"{NOISY_SPREAD:.0%}".replace("%", " percent")
    plot_metrics = pareto_metrics if pareto_metrics is not None else [m for m in metrics if m in QUALITY_METRICS]
    jobs = [("summary.csv", lambda: write_text_atomic(written["csv"], table.to_csv(index=False))),
            ("summary.tex", lambda: write_text_atomic(written["tex"], latex_table(human, caption=caption,
                                                                                  label=f"tab:{title}")))]
    plots: list[Path] = []
    jobs += [(f"pareto_{m}", lambda m=m: plots.extend(pareto_plot(table, m, baseline, output_dir, metrics_random_init)))
             for m in plot_metrics]
    jobs += [("latency_breakdown", lambda: plots.extend(latency_breakdown_plot(records, variants, output_dir,
                                                                               {name for name, _ in noisy}))),
             ("samples_grid", lambda: plots.extend(sample_grid_plot(records, variants, output_dir, rows=grid_rows)))]
    jobs.append(("summary.md", lambda: write_text_atomic(written["md"], summary_markdown(
        title, description, baseline, records, metrics, metrics_random_init, noisy, human, timing, interval1, plots,
        clip_model))))
    with tqdm(jobs, desc="reports", unit="file", disable=not show_progress, dynamic_ncols=True) as bar:
        for name, job in bar:
            bar.set_postfix_str(name)
            job()
    for p in plots:
        written[p.name] = p
    return written


def summary_markdown(title: str, description: str, baseline: str, records: list[dict[str, Any]], metrics: list[str],
                     metrics_random_init: bool, noisy: list[tuple[str, float]], human: pd.DataFrame,
                     timing: dict[str, Any] | None, interval1: dict[str, Any] | None, plots: list[Path],
                     clip_model: str = "ViT-L-14") -> str:
    notes = []
    if any(r.get("random_weights") for r in records):
        ckpts = sorted({str(r.get("ckpt")) for r in records if r.get("random_weights")})
        notes.append(f"**Random-weight pipeline** ({', '.join(ckpts)}): the images are noise by design; the quality "
                     f"metrics compare noise with noise.")
    if metrics_random_init and any(m in MODEL_METRICS for m in metrics):
        names = ", ".join(QUALITY_METRICS[m][1] for m in metrics if m in MODEL_METRICS)
        notes.append(f"**Random-init metric models** (`metrics_random_init`): the values of {names} come from "
                     f"networks with random weights; they test the plumbing and say nothing about image quality "
                     f"(columns and plots marked {RANDOM_INIT}). PSNR and SSIM are computed from the pixels alone.")
    if noisy:
        spreads = ", ".join(f"{name} {cv:.0%}" for name, cv in noisy)
        notes.append(f"**Noisy timings** ({spreads} latency spread, std / mean): above {NOISY_SPREAD:.0%}, the host "
                     f"was busy or the clock unsteady while they ran. Latencies and speedups marked (noisy) are not "
                     f"fit to quote: rerun those variants on a quiet machine.")
    md = [f"# Ablation: {title}\n", description.strip() + "\n" if description.strip() else "",
          f"Baseline: `{baseline}`. Speedup is the baseline's mean latency over the variant's; FLOPs speedup the "
          f"same for transformer FLOPs. PSNR/SSIM/LPIPS/FID compare each image with the baseline image of the same "
          f"prompt and seed (so the baseline has none; identical images have PSNR 100 dB, the cap); CLIP and "
          f"ImageReward score the prompt. Values are mean ± std over the images of each variant (column Images: N "
          f"per variant)." + (f" CLIP score: open_clip {clip_model} (100 x cosine of image and prompt embeddings)."
                              if "clip" in metrics else "")
          + (" ImageReward: ImageReward-v1.0." if "image_reward" in metrics else "") + "\n"]
    md += [note + "\n" for note in notes]
    md.append(markdown_table(human))
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
    return "\n".join(md)
