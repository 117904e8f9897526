"""utils/reports.py on synthetic records: numbers in the tables, the Pareto front, every file written."""

import pandas as pd
import pytest
from PIL import Image

from utils import reports


def fake_records(tmp_path, variants_latency: dict[str, list[float]], flops: dict[str, float]):
    records = []
    for variant, latencies in variants_latency.items():
        (tmp_path / variant).mkdir()
        for i, latency in enumerate(latencies):
            image = f"{variant}/p{i:04d}_s0.png"
            Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(tmp_path / image)
            records.append({"key": image[:-4], "variant": variant, "status": "ok", "prompt_index": i, "seed": 0,
                            "prompt": f"prompt number {i}", "image": image, "latency_s": latency,
                            "denoise_s": 0.5 * latency, "full_steps": 10 if variant == "base" else 4,
                            "forecast_steps": 0 if variant == "base" else 6, "flops": flops[variant],
                            "peak_memory_gb": None, "stages_s": {"prompt_encoding": 0.1, "denoising": 0.5 * latency,
                                                                 "decoding": 0.2, "postprocessing": 0.01}})
    return records


def test_variant_table_speedups_and_mean_std(tmp_path):
    records = fake_records(tmp_path, {"base": [2.0, 4.0], "fast": [1.0, 2.0]}, {"base": 8e12, "fast": 2e12})
    per_image = {"fast/p0000_s0": {"psnr": 30.0}, "fast/p0001_s0": {"psnr": 34.0}}
    table = reports.variant_table(records, ["base", "fast"], "base", {"base": "ok", "fast": "ok"}, ["psnr", "fid"],
                                  per_image, {"fast": {"fid": 12.5}})
    fast = table.set_index("variant").loc["fast"]
    assert fast["latency_s_mean"] == pytest.approx(1.5)
    assert fast["speedup"] == pytest.approx(3.0 / 1.5)
    assert fast["flops_speedup"] == pytest.approx(4.0)
    assert fast["psnr_mean"] == pytest.approx(32.0)
    assert fast["psnr_std"] == pytest.approx(pd.Series([30.0, 34.0]).std())
    assert fast["fid"] == 12.5 and fast["forecast_steps"] == 6
    base = table.set_index("variant").loc["base"]
    assert base["speedup"] == 1.0 and pd.isna(base["psnr_mean"])  # the baseline has no reference metrics

    human = reports.formatted_table(table, ["psnr", "fid"]).set_index("Variant")
    assert human.loc["fast", "PSNR (dB)"] == "32.00 ± 2.83"
    assert human.loc["fast", "Speedup"] == "2.00×" and human.loc["base", "PSNR (dB)"] == "—"


def test_pareto_front_respects_metric_direction():
    points = pd.DataFrame({"variant": ["a", "b", "c", "d"], "speedup": [1.0, 2.0, 3.0, 2.5],
                           "lpips": [0.0, 0.1, 0.3, 0.35]})
    assert sorted(reports.pareto_front(points, "lpips", "lower")) == ["a", "b", "c"]  # d: slower and worse than c
    points["psnr"] = [40.0, 30.0, 20.0, 25.0]
    assert sorted(reports.pareto_front(points, "psnr", "higher")) == ["a", "b", "c", "d"]


def test_write_report_writes_tables_plots_and_check_section(tmp_path):
    records = fake_records(tmp_path, {"base": [2.0, 2.2, 1.8], "fast": [1.0, 1.1, 0.9], "broken": []},
                           {"base": 8e12, "fast": 2e12, "broken": 1.0})
    per_image = {r["key"]: {"lpips": 0.1 * r["prompt_index"], "clip": 25.0 + r["prompt_index"]} for r in records
                 if r["variant"] == "fast"}
    per_image.update({r["key"]: {"clip": 30.0} for r in records if r["variant"] == "base"})
    status = {"base": "ok", "fast": "ok", "broken": "failed: StackError: needs CUDA"}
    interval1 = {"status": "FAIL", "passed": False, "table_md": "| pair | result |\n|---|---|\n| B vs A | FAIL |"}
    written = reports.write_report(tmp_path, "unit", "", records, ["base", "fast", "broken"], "base", status,
                                   ["lpips", "clip"], per_image, {}, timing={"wall_s": 3.0}, interval1=interval1)
    for name in ("summary.csv", "summary.md", "summary.tex", "pareto_lpips.png", "pareto_lpips.pdf", "pareto_clip.png",
                 "latency_breakdown.png", "latency_breakdown.pdf", "samples_grid.png", "samples_grid.pdf"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(written) >= {"csv", "md", "tex"}
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert list(csv["variant"]) == ["base", "fast", "broken"]
    assert csv.loc[2, "status"].startswith("failed: StackError") and csv.loc[2, "images"] == 0
    assert csv.loc[1, "clip_mean"] == pytest.approx(26.0)
    md = (tmp_path / "summary.md").read_text()
    assert "## interval=1 three-way check: FAIL" in md and "| B vs A | FAIL |" in md and "## Sweep time" in md
    tex = (tmp_path / "summary.tex").read_text()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "±" not in tex  # pdflatex-safe
