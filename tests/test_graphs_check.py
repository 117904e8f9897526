"""The step graphs check's verdict (utils/graphs_check.judge): graphed generations against the second eager one,
with each generation's own decisions. The generations themselves need a GPU (`run_benchmark.py --check graphs`)."""

import torch

from utils.graphs_check import REFERENCE, format_table, judge


def _runs(latents, graphed, chipmunk_per_generation=(3, 3, 3, 3, 3, 3), compiled=(8, 0, 0, 0, 0, 0)):
    """Six generations: the warm-up (its latents round apart), the reference, the floor, then three graphed."""
    names = ["eager 1", "eager 2", "eager 3", "graphs 1", "graphs 2", "graphs 3"]
    outs = [latents + 1e-3, latents, latents, *graphed]
    total, runs = 0, {}
    for name, out, n, c in zip(names, outs, chipmunk_per_generation, compiled):
        total += n  # Chipmunk's counts accumulate over the pipeline's life
        runs[name] = (out, 0.1, {"chipmunk": {"layer0": {"sparse": total}}, "cache_steps": ["full", "forecast"]}, c)
    return runs


def test_graphed_generations_equal_to_the_reference_pass_though_the_warm_up_rounds_apart():
    latents = torch.randn(1, 16, 32)
    rows, passed = judge(_runs(latents, [latents.clone()] * 3))
    assert REFERENCE == "eager 2" and passed
    by_run = {r["run"]: r for r in rows}
    assert not by_run["eager 1"]["bitwise_equal"] and by_run["eager 1"]["rel_error"] > 0
    assert all(by_run[n]["bitwise_equal"] and by_run[n]["same_decisions"] for n in by_run if n != "eager 1")
    assert "rel. error vs eager 2" in format_table(rows)


def test_one_ulp_off_other_decisions_or_a_recompile_fails():
    latents = torch.randn(1, 16, 32)
    nudged = latents.clone()
    nudged.view(-1)[7] = torch.nextafter(nudged.view(-1)[7], torch.tensor(float("inf")))
    assert not judge(_runs(latents, [latents, nudged, latents]))[1]
    rows, passed = judge(_runs(latents, [latents] * 3, chipmunk_per_generation=(3, 3, 3, 3, 2, 3)))
    assert not passed and [r["run"] for r in rows if not r["same_decisions"]] == ["graphs 2"]
    assert not judge(_runs(latents, [latents] * 3, compiled=(8, 0, 0, 1, 0, 0)))[1]
