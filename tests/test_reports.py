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
    assert human.loc["fast", "PSNR (dB)"] == "32.00 ± 2.83" and human.loc["base", "PSNR (dB)"] == "—"
    # 2 s and 4 s: a spread of 47% of the mean, so both timings, and the speedup between them, are noisy
    assert fast["latency_cv"] == pytest.approx(pd.Series([1.0, 2.0]).std() / 1.5) and fast["timing_noisy"]
    assert human.loc["fast", "Speedup"] == "2.00× (noisy)"
    assert human.loc["fast", "Latency (s)"] == "1.500 ± 0.707 (noisy)"


def test_noisy_timings_are_flagged_in_the_table_and_the_summary(tmp_path):
    records = fake_records(tmp_path, {"base": [2.0, 2.02, 1.98], "fast": [1.0, 1.01, 0.99], "busy": [0.5, 1.6, 0.6],
                                      "single": [1.0]}, {"base": 8e12, "fast": 2e12, "busy": 2e12, "single": 1e12})
    status = dict.fromkeys(["base", "fast", "busy", "single"], "ok")
    table = reports.variant_table(records, list(status), "base", status, [], {}, {}).set_index("variant")
    assert list(table["timing_noisy"]) == [False, False, True, False]  # one image: no spread to judge
    assert not table.loc["fast", "speedup_noisy"] and table.loc["busy", "speedup_noisy"]
    human = reports.formatted_table(table.reset_index(), []).set_index("Variant")
    assert human.loc["fast", "Speedup"] == "2.00×" and human.loc["busy", "Speedup"].endswith("× (noisy)")
    reports.write_report(tmp_path, "unit", "", records, list(status), "base", status, [], {}, {})
    md = (tmp_path / "summary.md").read_text()
    assert "**Noisy timings** (busy 68% latency spread, std / mean): above 25%" in md
    assert "(noisy)" in (tmp_path / "summary.tex").read_text()
    csv = pd.read_csv(tmp_path / "summary.csv").set_index("variant")
    assert bool(csv.loc["busy", "timing_noisy"]) and csv.loc["busy", "latency_cv"] == pytest.approx(0.6759, abs=1e-3)
    # a noisy baseline makes every speedup noisy
    table = reports.variant_table(records, list(status), "busy", status, [], {}, {}).set_index("variant")
    assert table["speedup_noisy"].all()


def test_small_values_keep_significant_digits():
    assert reports._number(1.234e-05, 3) == "1.23e-05" and reports._number(0.0099, 3) == "0.0099"
    assert reports._number(0.25, 3) == "0.250" and reports._number(0.0, 3) == "0.000"
    assert reports._number(56.294, 2) == "56.29" and reports._number(0.04, 2) == "0.04"
    assert reports._mean_std(1.08e-05, 4.04e-07, 3) == "1.08e-05 ± 4.04e-07"


def test_random_init_metrics_and_random_weight_images_are_labelled_everywhere(tmp_path, monkeypatch):
    records = fake_records(tmp_path, {"base": [2.0, 2.0], "fast": [1.0, 1.0]}, {"base": 8e12, "fast": 2e12})
    for r in records:
        r.update(random_weights=True, ckpt="tiny")
    per_image = {r["key"]: {"lpips": 1.2e-05 * (1 + r["prompt_index"]), "psnr": 50.0} for r in records
                 if r["variant"] == "fast"}
    figures = []
    real_save = reports._save
    monkeypatch.setattr(reports, "_save",
                        lambda fig, out, stem: figures.append((stem, fig)) or real_save(fig, out, stem))
    status = {"base": "ok", "fast": "ok"}
    reports.write_report(tmp_path, "unit", "", records, ["base", "fast"], "base", status, ["lpips", "psnr"],
                         per_image, {}, metrics_random_init=True)
    md = (tmp_path / "summary.md").read_text()
    assert ("**Random-init metric models** (`metrics_random_init`): the values of LPIPS come from networks with "
            "random weights") in md
    assert "**Random-weight pipeline** (tiny): the images are noise by design" in md
    assert "| LPIPS (random-init) |" in md and "| PSNR (dB) |" in md  # PSNR comes from pixels: no label
    assert "1.8e-05 ± 8.49e-06" in md  # not 0.000
    tex = (tmp_path / "summary.tex").read_text()
    assert "LPIPS (random-init)" in tex and "random-init marks metrics of random-weight metric models" in tex
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert set(csv["metric_models"]) == {"random-init"}
    titles = {stem: (fig.axes[0].get_title(), fig.axes[0].get_ylabel()) for stem, fig in figures}
    assert "random-init metric model" in titles["pareto_lpips"][0] and "meaningless" in titles["pareto_lpips"][1]
    assert titles["pareto_psnr"] == ("Speed vs quality: PSNR (dB)", "PSNR (dB) (higher is better)")
    grid = dict(figures)["samples_grid"]
    assert "random-weight pipeline: the images are noise by design" in grid._suptitle.get_text()


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
