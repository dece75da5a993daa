"""Scaling-law fits and the report: recover known power laws (noiseless against scipy's
curve_fit, noisy with bootstrap CIs that cover the truth), the joint law, the leave-largest-out
extrapolation, error-rate fits of retrieval, the "cannot support" warnings, the compute frontier
against a brute-force optimum, and the report CLI on a hand-written results.jsonl."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import curve_fit

from mindeye_dist.scaling import ResultsError, build_report, load_results
from mindeye_dist.scaling.fit import (bootstrap_fit, extrapolate_largest, fit_power_law, huber_objective,
                                      predict_direct, predict_log_lse)
from mindeye_dist.scaling.frontier import compute_frontier, lower_envelope
from mindeye_dist.scaling.markdown import num, pct
from mindeye_dist.scaling.results import SweepResults, Trial

ROOT = Path(__file__).resolve().parents[1]
E_TRUE, A_TRUE, ALPHA_TRUE = 1.8, 400.0, 0.35
B_TRUE, BETA_TRUE = 2000.0, 0.3


def law(n, E=E_TRUE, A=A_TRUE, alpha=ALPHA_TRUE):
    return E + A * np.asarray(n, dtype=np.float64) ** -alpha


def trial(i, params, data_size, val_loss, image=0.5, brain=0.4, **extra) -> Trial:
    fields = dict(trial_id=f"t{i}", params=float(params), data_size=float(data_size), samples_seen=20.0 * data_size,
                  flops=6.0 * params * 20.0 * data_size, lr=3e-4, val_loss=float(val_loss), val_image_top1=image,
                  val_brain_top1=brain, wall_s=1.0, overrides={"model.hidden_dim": i})
    fields.update(extra)
    return Trial(**fields)


# ---- the fitter --------------------------------------------------------------------------------

def test_lse_parameterisation_equals_direct_formula():
    rng = np.random.default_rng(0)
    for k in (1, 2):
        x = np.exp(rng.uniform(np.log(1e3), np.log(1e10), size=(40, k)))
        centre = np.log(x).mean(axis=0)
        theta = np.concatenate([[rng.uniform(-1, 2)], np.ravel([[rng.uniform(0, 8), rng.uniform(0.05, 1.5)]
                                                                for _ in range(k)])])
        A = np.exp(theta[1::2] + theta[2::2] * centre)  # a = a' + alpha * c
        log_pred, weights = predict_log_lse(theta, np.log(x) - centre)
        direct = predict_direct(np.exp(theta[0]), A, theta[2::2], x)
        np.testing.assert_allclose(np.exp(log_pred), direct, rtol=1e-12)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
        # The weights are each term's share of the prediction.
        np.testing.assert_allclose(weights[:, 0], np.exp(theta[0]) / direct, rtol=1e-10)


def test_huber_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    log_x = rng.normal(size=(12, 2))
    log_y = rng.normal(scale=0.5, size=12) + 1.0
    theta = np.array([0.3, 0.5, 0.4, -0.2, 0.7])
    # delta large enough that residuals fall in both regimes.
    value, grad = huber_objective(theta, log_x, log_y, delta=0.5)
    step = 1e-6
    numeric = [(huber_objective(theta + step * e, log_x, log_y, 0.5)[0]
                - huber_objective(theta - step * e, log_x, log_y, 0.5)[0]) / (2 * step) for e in np.eye(5)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    assert value > 0


def test_noiseless_power_law_recovered_and_agrees_with_curve_fit():
    n = np.geomspace(1e4, 1e6, 7)
    y = law(n)
    fit = fit_power_law(n, y)
    assert fit.converged and not fit.at_bounds
    np.testing.assert_allclose([fit.E, fit.A[0], fit.alpha[0]], [E_TRUE, A_TRUE, ALPHA_TRUE], rtol=1e-6)
    # Independent check: scipy's least-squares curve_fit on the plain formula, same data.
    (E_cf, A_cf, alpha_cf), _ = curve_fit(lambda x, E, A, alpha: E + A * x ** -alpha, n, y,
                                          p0=[1.0, 100.0, 0.5], maxfev=100_000)
    np.testing.assert_allclose([fit.E, fit.A[0], fit.alpha[0]], [E_cf, A_cf, alpha_cf], rtol=1e-5)


def test_noisy_power_law_estimate_within_tolerance_and_ci_covers_truth():
    rng = np.random.default_rng(7)
    n = np.repeat(np.geomspace(1e4, 1e6, 8), 2)  # 8 sizes over 2 decades, 2 seeds each
    y = law(n) * np.exp(rng.normal(0.0, 0.01, n.size))
    fit = fit_power_law(n, y)
    boot = bootstrap_fit(n, y, fit, 200, np.random.default_rng(0))
    ci = boot.ci95()  # rows E, A, alpha
    assert abs(fit.alpha[0] - ALPHA_TRUE) < 0.06 and abs(fit.E - E_TRUE) < 0.4
    for row, truth in zip(ci, (E_TRUE, A_TRUE, ALPHA_TRUE)):
        assert row[0] <= truth <= row[1], (row, truth)
    assert boot.degenerate == 0 and len(boot.samples) >= 190


def test_joint_fit_recovers_both_exponents():
    grid = np.array([(nn, d) for nn in np.geomspace(1e4, 1e6, 5) for d in np.geomspace(1e3, 1e5, 4)])
    y = E_TRUE + A_TRUE * grid[:, 0] ** -ALPHA_TRUE + B_TRUE * grid[:, 1] ** -BETA_TRUE
    fit = fit_power_law(grid, y)
    assert fit.converged
    np.testing.assert_allclose([fit.alpha[0], fit.alpha[1]], [ALPHA_TRUE, BETA_TRUE], rtol=1e-5)
    np.testing.assert_allclose([fit.E, fit.A[0], fit.A[1]], [E_TRUE, A_TRUE, B_TRUE], rtol=1e-4)


def test_extrapolation_leaves_out_every_run_at_the_largest_size():
    n = np.repeat(np.geomspace(1e4, 1e6, 6), 2)
    y = law(n)
    y[n == n.max()] *= 1.10  # the largest size is off the law; the fit without it cannot know
    ex = extrapolate_largest(n, y)
    assert ex.held_out == n.max() and ex.n_held_out == 2
    assert ex.predicted == pytest.approx(law(n.max()), rel=1e-6)  # the rest is an exact power law
    assert ex.observed == pytest.approx(1.10 * law(n.max()))
    assert ex.rel_error == pytest.approx(1 / 1.10 - 1, rel=1e-5)
    assert extrapolate_largest(n[n < np.unique(n)[3]], y[n < np.unique(n)[3]]) is None  # 3 sizes: nothing left


# ---- the report structure -----------------------------------------------------------------------

def test_error_rate_fit_of_bounded_retrieval():
    sizes = np.geomspace(1e4, 1e6, 6)
    err = 0.05 + 3.0 * sizes ** -0.3
    trials = [trial(i, s, 1000, law(s), image=1 - e, brain=1 - 1.2 * e) for i, (s, e) in enumerate(zip(sizes, err))]
    report = build_report(SweepResults(trials=trials, search=[]), "sweep", n_bootstrap=30)
    image = report["fits"]["image_error_vs_params"]
    assert image["status"] == "ok" and image["metric"] == "image_error"
    assert image["alpha"] == pytest.approx(0.3, rel=1e-4) and image["E"] == pytest.approx(0.05, rel=1e-3)
    assert report["fits"]["brain_error_vs_params"]["alpha"] == pytest.approx(0.3, rel=1e-4)
    assert report["fits"]["loss_vs_data"]["status"] == "skipped"  # data never varied


def test_warnings_for_three_sizes_one_decade_and_flat_data():
    few = [trial(i, s, 1000, law(s)) for i, s in enumerate([1e5, 3e5, 1e6])]
    fit = build_report(SweepResults(trials=few, search=[]), "sweep", n_bootstrap=20)["fits"]["loss_vs_params"]
    tags = {w.split(":")[0] for w in fit["warnings"]}
    assert {"few sizes", "narrow range", "exact fit", "extrapolation", "bootstrap"} <= tags, fit["warnings"]
    assert fit["extrapolation"] is None and fit["decades"] == pytest.approx(1.0)
    assert fit["supported"] is False and "3 sizes of N over 1.00 decades" in fit["not_supported_because"][0]

    rng = np.random.default_rng(3)
    flat = [trial(i, s, 1000, 3.0 * math.exp(rng.normal(0, 0.002))) for i, s in enumerate(np.geomspace(1e4, 1e6, 6))]
    fit = build_report(SweepResults(trials=flat, search=[]), "sweep", n_bootstrap=20)["fits"]["loss_vs_params"]
    tags = {w.split(":")[0] for w in fit["warnings"]}
    assert "saturation" in tags and ("CI spans zero" in tags or "at bound" in tags), fit["warnings"]
    assert fit["supported"] is False

    two = build_report(SweepResults(trials=few[:2], search=[]), "sweep", n_bootstrap=10)["fits"]["loss_vs_params"]
    assert two["status"] == "skipped" and "not fitted" in two["warnings"][0]


def test_compute_frontier_envelope_and_fitted_optimum_against_brute_force():
    # FLOPs = 120 N D: t0 1.2e9, t2 6e9, t1 1.2e10, t3 1.2e11.
    t = [trial(0, 1e4, 1e3, 5.0), trial(1, 1e5, 1e3, 4.0), trial(2, 1e4, 5e3, 4.5), trial(3, 1e6, 1e3, 4.2)]
    assert [x.trial_id for x in lower_envelope(t)] == ["t0", "t2", "t1"]  # t3 costs more than t1, and is worse
    joint = {"status": "ok", "E": E_TRUE, "A": A_TRUE, "alpha": ALPHA_TRUE, "B": B_TRUE, "beta": BETA_TRUE}
    grid = [trial(i, nn, d, 1.0) for i, (nn, d) in enumerate((nn, d) for nn in np.geomspace(1e4, 1e8, 5)
                                                             for d in np.geomspace(1e3, 1e7, 5))]
    fitted = compute_frontier(grid, joint)["fitted"]
    assert fitted["kappa"] == pytest.approx(120.0)
    assert fitted["n_opt_exponent"] == pytest.approx(BETA_TRUE / (ALPHA_TRUE + BETA_TRUE))
    curve = fitted["curve"]
    for c, n_opt in list(zip(curve["flops"], curve["n_opt"]))[::15]:
        candidates = np.geomspace(1, 1e14, 200_001)
        loss = E_TRUE + A_TRUE * candidates ** -ALPHA_TRUE + B_TRUE * (c / (120.0 * candidates)) ** -BETA_TRUE
        assert n_opt == pytest.approx(candidates[np.argmin(loss)], rel=1e-3)


# ---- results.jsonl and the CLI -----------------------------------------------------------------

# Hand-written: 6 sizes over 2 decades; t6 loses to ridge on brain retrieval; two LR-search rows.
RESULTS = """\
{"trial_id": "t1", "params": 10000, "data_size": 1000, "samples_seen": 20000, "flops": 1.2e9, "lr": 0.001, "val_loss": 17.71, "val_image_top1": 0.21, "val_brain_top1": 0.19, "wall_s": 30.5, "overrides": {"model.hidden_dim": 32}, "ridge_image_top1": 0.08, "ridge_brain_top1": 0.07, "role": "final", "status": "finished", "seed": 0, "way": 50}
{"trial_id": "t2", "params": 25119, "data_size": 1000, "samples_seen": 20000, "flops": 3.0e9, "lr": 0.001, "val_loss": 12.11, "val_image_top1": 0.29, "val_brain_top1": 0.26, "wall_s": 33.0, "overrides": {"model.hidden_dim": 64}, "ridge_image_top1": 0.08, "ridge_brain_top1": 0.07, "role": "final", "seed": 0, "way": 50}
{"trial_id": "t3", "params": 63096, "data_size": 1000, "samples_seen": 20000, "flops": 7.6e9, "lr": 0.0006, "val_loss": 8.62, "val_image_top1": 0.37, "val_brain_top1": 0.31, "wall_s": 41.2, "overrides": {"model.hidden_dim": 128}, "ridge_image_top1": 0.08, "ridge_brain_top1": 0.07, "seed": 0, "way": 50}
{"trial_id": "t4", "params": 158489, "data_size": 1000, "samples_seen": 20000, "flops": 1.9e10, "lr": 0.0006, "val_loss": 6.49, "val_image_top1": 0.44, "val_brain_top1": 0.37, "wall_s": 55.0, "overrides": {"model.hidden_dim": 256}, "ridge_image_top1": 0.08, "ridge_brain_top1": 0.07, "seed": 0, "way": 50}
{"trial_id": "t5", "params": 398107, "data_size": 1000, "samples_seen": 20000, "flops": 4.8e10, "lr": 0.0003, "val_loss": 5.12, "val_image_top1": 0.5, "val_brain_top1": 0.42, "wall_s": 80.1, "overrides": {"model.hidden_dim": 512}, "ridge_image_top1": 0.08, "ridge_brain_top1": 0.07, "seed": 0, "way": 50}
{"trial_id": "t6", "params": 1000000, "data_size": 1000, "samples_seen": 20000, "flops": 1.2e11, "lr": 0.0003, "val_loss": 4.27, "val_image_top1": 0.55, "val_brain_top1": 0.05, "wall_s": 130.0, "overrides": {"model.hidden_dim": 1024}, "ridge_image_top1": 0.08, "ridge_brain_top1": 0.07, "seed": 0, "way": 50}
{"trial_id": "s1", "role": "lr_search", "params": 1000000, "data_size": 1000, "lr": 0.0003, "samples_seen": 4000, "rung": 1, "val_loss": 6.0, "status": "finished"}
{"trial_id": "s2", "role": "lr_search", "params": 1000000, "data_size": 1000, "lr": 0.003, "samples_seen": 1000, "rung": 0, "val_loss": 9.5, "status": "stopped early"}
"""


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweep")
    (sweep / "results.jsonl").write_text(RESULTS)
    (sweep / "sweep.json").write_text(json.dumps({"name": "hand-written"}))
    out = sweep / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "report.py"), str(sweep), "--out", str(out),
                           "--bootstrap", "50", "--seed", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "alpha =" in proc.stdout
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_cli_writes_every_file_and_flags_below_ridge(cli_report):
    out, report, md = cli_report
    for name in ("loss_vs_params", "loss_vs_compute", "retrieval_vs_params", "residuals"):
        assert report["figures"][name] == f"{name}.png"
        with Image.open(out / f"{name}.png") as img:
            assert img.format == "PNG" and img.size[0] >= 700
        assert f"]({name}.png)" in md
    assert "loss_vs_data" not in report["figures"]  # one data size: no data axis to draw
    fit = report["fits"]["loss_vs_params"]
    for key in ("alpha", "alpha_ci95", "A", "A_ci95", "E", "E_ci95", "n_runs", "n_sizes", "decades",
                "huber_delta", "bootstrap", "extrapolation", "converged", "warnings"):
        assert key in fit, key
    assert fit["n_runs"] == 6 and fit["bootstrap"] == 50 and fit["huber_delta"] == 1e-3
    assert fit["alpha_ci95"][0] <= fit["alpha"] <= fit["alpha_ci95"][1]
    assert fit["extrapolation"]["held_out"] == 1e6
    assert report["below_ridge"] == ["t6"]
    # Clean loss curve: supported. Brain retrieval collapses at the largest size (t6): not supported.
    assert fit["supported"] and fit["alpha_ci95_rel_width"] < 0.5
    brain = report["fits"]["brain_error_vs_params"]
    assert brain["supported"] is False and "note" in brain
    assert any("extrapolating to the largest size" in r for r in brain["not_supported_because"])
    assert "**brain_error_vs_params: not supported**" in md and "**loss_vs_params: supported.**" in md
    assert [r["chosen"] for r in report["lr_search"]] == [True, False]
    assert report["sweep"]["name"] == "hand-written" and md.startswith("# Scaling report: hand-written")


def test_report_json_numbers_are_report_md_numbers(cli_report):
    _, report, md = cli_report
    checked = 0
    for name, fit in report["fits"].items():
        if fit["status"] != "ok":
            assert f"### {name}" in md and "Not fitted" in md
            continue
        for p in [k[:-5] for k in fit if k.endswith("_ci95")]:
            lo, hi = fit[f"{p}_ci95"]
            assert f"| {p} | {num(fit[p])} | {num(lo)} | {num(hi)} |" in md, (name, p)
            checked += 1
        ex = fit["extrapolation"]
        assert f"| N = {num(ex['held_out'])} | {num(ex['predicted'])} | {num(ex['observed'])} | {pct(ex['rel_error'])} |" in md
    assert checked >= 9
    alpha = report["fits"]["loss_vs_params"]
    assert f"α = {num(alpha['alpha'])} (95% CI {num(alpha['alpha_ci95'][0])} to {num(alpha['alpha_ci95'][1])})" in md
    # Every number printed in the fit tables parses back to the JSON value within its rounding.
    for line in md.splitlines():
        m = re.fullmatch(r"\| (alpha|beta|A|B|E) \| (\S+) \| (\S+) \| (\S+) \|", line)
        if m:
            assert any(float(m.group(2)) == pytest.approx(f.get(m.group(1), math.inf), rel=5e-4)
                       for f in report["fits"].values() if f["status"] == "ok")


def test_cli_refuses_malformed_results_naming_trial_and_field(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "launchers"))
    try:
        from report import main
    finally:
        sys.path.remove(str(ROOT / "launchers"))
    rows = RESULTS.splitlines()
    bad = json.loads(rows[2])
    del bad["val_loss"]
    (tmp_path / "results.jsonl").write_text("\n".join([rows[0], rows[1], json.dumps(bad)]) + "\n")
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "results.jsonl:3" in err and "'t3'" in err and "'val_loss'" in err
    assert not (tmp_path / "r" / "report.json").exists()

    bad = json.loads(rows[0])
    bad["val_image_top1"] = 21.0  # a percentage where a fraction belongs
    (tmp_path / "results.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ResultsError, match=r"trial 't1': field 'val_image_top1' must be >= 0 and <= 1"):
        load_results(tmp_path)
    (tmp_path / "results.jsonl").write_text(rows[0] + "\n{not json\n")
    with pytest.raises(ResultsError, match=r"results.jsonl:2: not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.jsonl").write_text(rows[0].replace('"role": "final"', '"role": "rung"') + "\n")
    with pytest.raises(ResultsError, match=r"field 'role' must be one of final, lr_search"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match=r"run `python launchers/sweep.py"):
        load_results(tmp_path / "missing")


def test_loader_keeps_last_duplicate_and_needs_little_of_search_rows(tmp_path):
    rows = RESULTS.splitlines()
    again = json.loads(rows[0])
    again["val_loss"] = 17.0
    (tmp_path / "results.jsonl").write_text("\n".join(rows + [json.dumps(again), ""]))
    results = load_results(tmp_path)
    assert len(results.trials) == 6 and len(results.search) == 2
    assert next(t for t in results.trials if t.trial_id == "t1").val_loss == 17.0
    assert "lines 1 and 9" in results.notes[0]
    assert results.trials[-1].ridge_brain_top1 == 0.07 and results.search[1].rung == 0


def test_bootstrap_1000_on_a_small_problem():
    rng = np.random.default_rng(11)
    n = np.geomspace(1e4, 1e6, 6)
    y = law(n) * np.exp(rng.normal(0, 0.005, n.size))
    fit = fit_power_law(n, y)
    boot = bootstrap_fit(n, y, fit, 1000, np.random.default_rng(0))
    # 6 runs: resamples with fewer than 3 distinct sizes cannot be fitted and are skipped.
    assert boot.requested == 1000 and len(boot.samples) + boot.degenerate + boot.failed == 1000
    assert len(boot.samples) >= 900 and boot.failed <= 10
    low, high = boot.ci95()[2]
    assert low < ALPHA_TRUE < high and low < fit.alpha[0] < high
    # The band holds the fitted curve between the smallest and largest size.
    band = boot.band(n)
    assert np.all(band[0] <= fit.predict(n) * (1 + 1e-9)) and np.all(fit.predict(n) <= band[1] * (1 + 1e-9))


def test_objective_scaling_keeps_lbfgs_from_stopping_early():
    """Besiroglu et al. 2024: a mean-reduced Huber(1e-3) objective under L-BFGS's default tolerances
    stops early. Ours (sum / delta, tight tolerances) reaches the noiseless optimum from every start."""
    from scipy.optimize import minimize

    from mindeye_dist.scaling import fit as F

    n = np.geomspace(1e4, 1e6, 7)
    y = law(n)
    log_x, log_y = (np.log(n) - np.log(n).mean())[:, None], np.log(y)
    bounds = F._bounds(log_y, 1)

    def mean_huber(theta):  # the objective before rescaling: mean of Huber_delta
        value, grad = huber_objective(theta, log_x, log_y)
        return value * F.HUBER_DELTA / n.size, grad * F.HUBER_DELTA / n.size

    ours, naive = [], []
    with F.single_threaded_blas():
        for start in F._initial_grid(log_x, y):
            ours.append(F._run_lbfgs(start, log_x, log_y, bounds)[0][2])
            naive.append(minimize(mean_huber, start, jac=True, method="L-BFGS-B", bounds=bounds).x[2])
    assert np.max(np.abs(np.array(ours) - ALPHA_TRUE)) < 1e-8
    assert np.max(np.abs(np.array(naive) - ALPHA_TRUE)) > 1e3 * np.max(np.abs(np.array(ours) - ALPHA_TRUE))


def _write_rows(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


BASE_ROW = dict(params=1e4, data_size=1000, samples_seen=2e4, flops=1.2e9, lr=1e-3, val_loss=5.0,
                val_image_top1=0.3, val_brain_top1=0.2, wall_s=1.0, overrides={})


def test_report_never_crashes_on_too_little_data(tmp_path):
    from mindeye_dist.scaling import write_report

    one = write_report(_write_rows(tmp_path / "one", [dict(BASE_ROW, trial_id="a", flops=0)]), tmp_path / "r1",
                       n_bootstrap=10)
    assert all(f["status"] == "skipped" for f in one["fits"].values())
    assert "loss_vs_compute" not in one["figures"]  # no run records FLOPs
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "1 run(s) at 1 distinct N value(s)" in md and "No run records training FLOPs" in md
    # No bootstrap at all: estimates without CIs (JSON null), not a crash on NaN.
    rows = [dict(BASE_ROW, trial_id=f"b{i}", params=s, val_loss=float(law(s))) for i, s in enumerate(np.geomspace(1e4, 1e6, 5))]
    none = write_report(_write_rows(tmp_path / "noboot", rows), tmp_path / "r0", n_bootstrap=0)["fits"]["loss_vs_params"]
    assert none["alpha"] == pytest.approx(ALPHA_TRUE) and none["alpha_ci95"] == [None, None] and not none["supported"]
    assert json.loads((tmp_path / "r0" / "report.json").read_text())["fits"]["loss_vs_params"]["alpha_ci95"] == [None, None]
    with pytest.raises(ResultsError, match="no final trial has a finished status"):
        write_report(_write_rows(tmp_path / "failed", [dict(BASE_ROW, trial_id="a", status="error")]),
                     tmp_path / "r2", n_bootstrap=10)


def test_report_on_a_three_by_three_grid_fits_the_joint_law(tmp_path):
    from mindeye_dist.scaling import write_report

    rows = [dict(BASE_ROW, trial_id=f"g{i}{j}", params=10.0 ** (4 + i), data_size=10.0 ** (3 + j),
                 flops=120 * 10.0 ** (7 + i + j), val_image_top1=0.95 - 3 * 10.0 ** (-(4 + i) * 0.3),
                 val_brain_top1=0.9 - 3 * 10.0 ** (-(4 + i) * 0.3),
                 val_loss=float(E_TRUE + A_TRUE * 10.0 ** (-(4 + i) * ALPHA_TRUE) + B_TRUE * 10.0 ** (-(3 + j) * BETA_TRUE)))
            for i in range(3) for j in range(3)]
    report = write_report(_write_rows(tmp_path / "grid", rows), tmp_path / "r", n_bootstrap=10)
    joint = report["fits"]["loss_joint"]
    assert joint["alpha"] == pytest.approx(ALPHA_TRUE, rel=1e-4) and joint["beta"] == pytest.approx(BETA_TRUE, rel=1e-4)
    assert set(joint["extrapolation"]) == {"N", "D"} and joint["supported"] is False  # 3 sizes per axis
    assert report["fits"]["loss_vs_params"]["slice"] == {"data_size": 1e5}  # the largest D
    assert report["fits"]["loss_vs_params"]["extrapolation"] is None
    assert report["compute_frontier"]["fitted"]["kappa"] == pytest.approx(120.0)
    assert {"loss_vs_params", "loss_vs_data", "loss_vs_compute", "residuals"} <= set(report["figures"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"| beta | {num(joint['beta'])} |" in md and "N_opt ∝ C^" in md
