"""``bench learner``: offline per-sample learning cost, fused learner against the naive torch loop.

Same model (8-32-32-1 MLP, ReLU, regression on a standardised target, gradient
clipping at 1.0), same initial weights, same stream, same process, interleaved
repeats:

* ``fused``: :class:`streamlearn.learner.Learner` (numpy kernels over one flat buffer);
* ``torch``: :class:`streamlearn.learner_torch.TorchLearner`, the textbook loop
  (``zero_grad``, forward, loss, ``backward``, ``clip_grad_norm_``, ``step``),
  one thread;
* ``deep-river``: its MLP regressor, when importable (it is not installed by
  this benchmark);
* ``river linear``: StandardScaler | LinearRegression, for scale only.

Strict test-then-train: for every sample, predict with the model that has
learned every earlier sample, then learn it. Reported per sample, median of the
repeats. Also micro-batches of 32 (``learn_many``), and the agreement of the
fused learner's predictions with torch's over the whole stream: with plain SGD
they agree step for step; with momentum or Adam float32 rounding differences are
amplified chaotically after ~1000 steps, which the same torch loop in float64
shows against itself in float32.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamlearn.bench.common import console, environment, fmt, learner_stream, median, spread, write_json

HIDDEN = (32, 32)
TOL = 1e-5


def _optimizers() -> dict[str, Any]:
    from streamlearn.config import OptimizerConfig

    return {
        "sgd": OptimizerConfig(name="sgd", lr=0.01),
        "sgd-momentum": OptimizerConfig(name="sgd", lr=0.01, momentum=0.9),
        "adam": OptimizerConfig(name="adam", lr=0.003),
    }


def _twins(opt: Any) -> tuple[Any, Any]:
    """A fused learner and a torch learner with identical initial weights."""
    from streamlearn.learner import Learner
    from streamlearn.learner_torch import TorchLearner
    from streamlearn.models import ModelShape
    from streamlearn.models.torch_modules import from_torch

    shape = ModelShape(8, HIDDEN, 1)
    reference = TorchLearner(shape, "regression", opt, seed=0)
    fused = Learner(shape, "regression", opt)
    fused.net.load_state_dict(from_torch(reference.module))
    return fused, reference


def _strict(learner: Any, X: np.ndarray, Y: np.ndarray) -> float:
    """Seconds per sample of predict-then-learn over the stream."""
    gc.collect()
    t0 = time.perf_counter()
    for x, y in zip(X, Y):
        learner.predict_one(x)
        learner.learn_one(x, float(y))
    return (time.perf_counter() - t0) / len(X)


def _predict_only(learner: Any, X: np.ndarray) -> float:
    t0 = time.perf_counter()
    for x in X:
        learner.predict_one(x)
    return (time.perf_counter() - t0) / len(X)


def _micro(learner: Any, X: np.ndarray, Y: np.ndarray, batch: int, predict: bool) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for i in range(0, len(X), batch):
        if predict:
            learner.predict_many(X[i:i + batch])
        learner.learn_many(X[i:i + batch], Y[i:i + batch])
    return (time.perf_counter() - t0) / len(X)


def timing(X: np.ndarray, Y: np.ndarray, repeats: int, batch: int = 32) -> dict[str, Any]:
    """us per sample for each engine and optimizer, median of interleaved repeats."""
    runs: dict[str, list[float]] = {}

    def add(key: str, seconds: float) -> None:
        runs.setdefault(key, []).append(seconds * 1e6)

    opts = _optimizers()
    for name in ("sgd", "adam"):  # first calls (allocator, dispatch caches) are not what we measure
        for eng in _twins(opts[name]):
            _strict(eng, X[:min(200, len(X))], Y[:min(200, len(X))])
            _micro(eng, X[:min(320, len(X))], Y[:min(320, len(X))], batch, predict=True)
    for _ in range(repeats):
        for name in ("sgd", "adam"):
            fused, ref = _twins(opts[name])
            add(f"fused.strict.{name}", _strict(fused, X, Y))
            add(f"torch.strict.{name}", _strict(ref, X, Y))
        fused, ref = _twins(opts["sgd"])
        add("fused.predict", _predict_only(fused, X))
        add("torch.predict", _predict_only(ref, X))
        fused, ref = _twins(opts["sgd"])
        add("fused.learn_only.sgd", _learn_only(fused, X, Y))
        add("torch.learn_only.sgd", _learn_only(ref, X, Y))
        for name in ("sgd", "adam"):
            fused, ref = _twins(opts[name])
            add(f"fused.batch{batch}.{name}", _micro(fused, X, Y, batch, predict=False))
            add(f"torch.batch{batch}.{name}", _micro(ref, X, Y, batch, predict=False))
            fused, ref = _twins(opts[name])
            add(f"fused.batch{batch}_tt.{name}", _micro(fused, X, Y, batch, predict=True))
            add(f"torch.batch{batch}_tt.{name}", _micro(ref, X, Y, batch, predict=True))
    return {k: {"us_median": round(median(v) or 0.0, 2), "us_runs": spread(v)} for k, v in runs.items()}


def _learn_only(learner: Any, X: np.ndarray, Y: np.ndarray) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for x, y in zip(X, Y):
        learner.learn_one(x, float(y))
    return (time.perf_counter() - t0) / len(X)


def agreement(X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    """Fused vs torch float32, and torch float32 vs torch float64, over the stream (strict)."""
    import torch

    from streamlearn.learner import TargetScaler
    from streamlearn.models.torch_modules import from_torch

    out: dict[str, Any] = {}
    for name, opt in _optimizers().items():
        fused, ref = _twins(opt)
        # the same torch loop in float64 (its own copy of the initial weights and target scaler)
        m64 = copy.deepcopy(ref.module).double()
        params64 = list(m64.parameters())
        if opt.name == "sgd":
            o64: Any = torch.optim.SGD(params64, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        else:
            o64 = torch.optim.Adam(params64, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        scaler64 = TargetScaler()
        d_fused, d_64 = [], []
        for x, y in zip(X, Y):
            p_f = float(fused.predict_one(x)[0])
            p_t = float(ref.predict_one(x)[0])
            xt = torch.from_numpy(x.astype(np.float64))[None, :]
            with torch.no_grad():
                p_64 = float(m64(xt)[0, 0]) * scaler64.std + scaler64.mean
            d_fused.append(abs(p_f - p_t))
            d_64.append(abs(p_64 - p_t))
            fused.learn_one(x, float(y))
            ref.learn_one(x, float(y))
            scaler64.update(float(y))
            ys = (float(y) - scaler64.mean) / scaler64.std
            o64.zero_grad()
            loss = torch.nn.functional.mse_loss(m64(xt), torch.tensor([[ys]], dtype=torch.float64))
            loss.backward()
            if opt.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params64, opt.clip_norm)
            o64.step()
        ref_params = from_torch(ref.module)
        param_diff = max(float(np.abs(ref_params[k] - v).max()) for k, v in fused.net.state_dict().items())
        df, d6 = np.asarray(d_fused), np.asarray(d_64)
        out[name] = {
            "steps": len(X),
            "max_abs_pred_diff_fused_vs_torch": float(df.max()),
            "max_abs_pred_diff_first_1000": float(df[:1000].max()),
            "first_step_over_1e-5": _first_over(df),
            "max_abs_param_diff_end": param_diff,
            "max_abs_pred_diff_torch32_vs_torch64": float(d6.max()),
            "torch32_vs_64_first_step_over_1e-5": _first_over(d6),
            "target_std": float(np.std(Y)),
            "match_1e-5": bool(df.max() <= TOL),
        }
    return out


def _first_over(d: np.ndarray) -> int | None:
    idx = np.flatnonzero(d > TOL)
    return int(idx[0]) if len(idx) else None


def deep_river(X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    """deep-river's MLP regressor on the same stream, if it is installed (it is not installed here)."""
    try:
        import deep_river  # noqa: F401
    except ImportError:
        return {"available": False, "note": "deep-river is not installed (the benchmark does not install it)"}
    try:  # API of deep-river 0.2.x; other versions may differ
        import torch
        from deep_river.regression import Regressor

        class MLP(torch.nn.Module):
            def __init__(self, n_features: int = 8) -> None:
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(n_features, 32), torch.nn.ReLU(),
                                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

            def forward(self, x: Any) -> Any:
                return self.net(x)

        model = Regressor(module=MLP, loss_fn="mse", optimizer_fn="sgd", lr=0.01)
        rows = [{f"x{j}": float(v) for j, v in enumerate(x)} for x in X]
        t0 = time.perf_counter()
        for row, y in zip(rows, Y):
            model.predict_one(row)
            model.learn_one(row, float(y))
        us = (time.perf_counter() - t0) / len(X) * 1e6
        return {"available": True, "strict_us": round(us, 2)}
    except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
        return {"available": True, "error": f"{type(exc).__name__}: {exc}"}


def river_linear(X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    try:
        from river import linear_model, preprocessing
    except ImportError:
        return {"available": False}
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    rows = [{f"x{j}": float(v) for j, v in enumerate(x)} for x in X]
    t0 = time.perf_counter()
    for row, y in zip(rows, Y):
        model.predict_one(row)
        model.learn_one(row, float(y))
    return {"available": True, "strict_us": round((time.perf_counter() - t0) / len(X) * 1e6, 2)}


def run_learner_bench(out_json: Path | None = Path("reports/bench-learner.json"), quick: bool = False,
                      n: int | None = None, repeats: int | None = None, agreement_n: int | None = None,
                      print_table: bool = True) -> dict[str, Any]:
    """Run the learner benchmark; print a table, write ``out_json``, return the results."""
    import torch

    import streamlearn.learner_torch  # noqa: F401 - sets torch to one thread, as the agent would

    n = n or (500 if quick else 5_000)
    repeats = repeats or (1 if quick else 5)
    agreement_n = agreement_n or (500 if quick else 5_000)
    X, Y = learner_stream(n)
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "learner", "quick": quick, "environment": environment(),
        "model": "MLP 8-32-32-1 ReLU, regression (standardised target), clip_norm 1.0",
        "n": n, "repeats": repeats, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    results["timing"] = timing(X, Y, repeats)
    Xa, Ya = learner_stream(agreement_n, seed=2)
    results["agreement"] = agreement(Xa, Ya)
    results["deep_river"] = deep_river(X[: min(n, 2000)], Y[: min(n, 2000)])
    results["river_linear"] = river_linear(X, Y)
    t = results["timing"]

    def us(key: str) -> float | None:
        return t.get(key, {}).get("us_median")

    def ratio(a: str, b: str) -> float | None:
        x, y = us(a), us(b)
        return round(x / y, 3) if x and y else None

    summary = {
        "fused_strict_us_sgd": us("fused.strict.sgd"),
        "torch_strict_us_sgd": us("torch.strict.sgd"),
        "strict_ratio_sgd": ratio("fused.strict.sgd", "torch.strict.sgd"),
        "fused_strict_us_adam": us("fused.strict.adam"),
        "torch_strict_us_adam": us("torch.strict.adam"),
        "strict_ratio_adam": ratio("fused.strict.adam", "torch.strict.adam"),
        "fused_batch32_us_sgd": us("fused.batch32.sgd"),
        "torch_batch32_us_sgd": us("torch.batch32.sgd"),
        "fused_batch32_us_adam": us("fused.batch32.adam"),
        "sgd_predictions_match_1e5": results["agreement"]["sgd"]["match_1e-5"],
        "target": "strict per-sample cost <= 0.25x the naive torch loop, same results to 1e-5",
    }
    summary["met"] = bool(summary["strict_ratio_sgd"] is not None and summary["strict_ratio_sgd"] <= 0.25
                          and summary["sgd_predictions_match_1e5"])
    results["summary"] = summary
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(out_json, results)
    if print_table:
        print_learner(results)
        if out_json is not None:
            console().print(f"wrote {out_json} ({results['elapsed_s']} s)")
    return results


def print_learner(results: dict[str, Any]) -> None:
    from rich.table import Table

    c = console()
    t = results["timing"]

    def us(key: str) -> str:
        return fmt(t.get(key, {}).get("us_median"))

    table = Table(title=f"learner cost, us per sample (median of {results['repeats']} x {results['n']:,} samples; "
                        f"{results['model']})")
    for col in ("engine", "strict SGD", "strict Adam", "predict", "learn (SGD)", "batch 32 SGD", "batch 32 Adam",
                "batch 32 predict+learn SGD"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for eng in ("fused", "torch"):
        table.add_row(eng, us(f"{eng}.strict.sgd"), us(f"{eng}.strict.adam"), us(f"{eng}.predict"),
                      us(f"{eng}.learn_only.sgd"), us(f"{eng}.batch32.sgd"), us(f"{eng}.batch32.adam"),
                      us(f"{eng}.batch32_tt.sgd"))
    s = results["summary"]
    table.add_row("[b]fused / torch[/b]", fmt(s["strict_ratio_sgd"]), fmt(s["strict_ratio_adam"]), "", "", "", "", "")
    dr = results["deep_river"]
    table.add_row("deep-river", fmt(dr.get("strict_us")) if dr.get("strict_us") else
                  (dr.get("note") or dr.get("error") or "-"), "", "", "", "", "", "")
    rl = results["river_linear"]
    table.add_row("river StandardScaler|LinearRegression", fmt(rl.get("strict_us")), "", "", "", "", "", "")
    c.print(table)
    at = Table(title="fused vs torch predictions over the stream (strict test-then-train, target units)")
    for col in ("optimizer", "steps", "max |fused - torch|", "first step > 1e-5", "max |param diff| at end",
                "torch f32 vs f64: max", "f32 vs f64: first step > 1e-5", "match 1e-5"):
        at.add_column(col, justify="left" if col == "optimizer" else "right")
    for name, a in results["agreement"].items():
        at.add_row(name, fmt(a["steps"]), f"{a['max_abs_pred_diff_fused_vs_torch']:.2e}",
                   fmt(a["first_step_over_1e-5"]), f"{a['max_abs_param_diff_end']:.2e}",
                   f"{a['max_abs_pred_diff_torch32_vs_torch64']:.2e}", fmt(a["torch32_vs_64_first_step_over_1e-5"]),
                   fmt(a["match_1e-5"]))
    c.print(at)
    c.print(f"target: strict cost <= 0.25x torch with the same results to 1e-5 -> ratio {fmt(s['strict_ratio_sgd'])}, "
            f"SGD match {fmt(s['sgd_predictions_match_1e5'])}: {'met' if s['met'] else 'missed'}")


if __name__ == "__main__":  # pragma: no cover
    run_learner_bench()
