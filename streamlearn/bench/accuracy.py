"""``streamlearn bench accuracy``: learning-rate policies against the best fixed rate in hindsight.

Every model sees the same streams prequentially (predict, then learn, one sample
at a time). The streamlearn models are driven through
:class:`streamlearn.stream.Slot`, the very code the agent runs (feature scaling,
the fused MLP, the policy, the drift monitor), so the figures describe the agent.

Streams (river's synthetic generators and bundled data; nothing is downloaded):

==================  ===========  ==========================================================
name                task         drift
==================  ===========  ==========================================================
friedman_abrupt     regression   FriedmanDrift global abrupt ("gra") at 1/3 and 2/3
friedman_gradual    regression   FriedmanDrift global gradual ("gsg"), 500-sample transitions
friedman_local      regression   FriedmanDrift local expanding abrupt ("lea") at 1/4, 1/2, 3/4
hyperplane          binary       rotating Hyperplane (incremental drift, no fixed points)
sea                 binary       SEA, concept 0 -> 2 abruptly at the middle (a ConceptDriftStream)
agrawal             binary       Agrawal, function 0 -> 2 abruptly at the middle
rbf                 multiclass   RandomRBFDrift, 3 classes, moving centroids
trump               regression   TrumpApproval (bundled, 1,001 samples)
phishing            binary       Phishing (bundled, 1,250 samples)
waterflow           regression   WaterFlow (bundled, 1,268 samples), self-supervised: forecast
                                 the flow 1 step ahead from the last 4 readings
==================  ===========  ==========================================================

Baselines: the fixed learning-rate grid (same model, same optimizer; its best
rate per stream, chosen in hindsight, is the bar), river's linear model with a
StandardScaler (LinearRegression / LogisticRegression / SoftmaxRegression),
river's Adaptive Random Forest, and the naive predictors (running mean and last
value; majority class).

Error is the mean absolute error (regression) or the error rate (classification)
of every prediction. For streams with known drift points it also reports the
error in the ``window`` samples after each drift and the samples until the
100-sample rolling error is back within 10% of its level before the drift.
"""

from __future__ import annotations

import abc
import csv
import itertools
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FIXED_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass(frozen=True)
class BenchStream:
    name: str
    task: str
    n: int
    drifts: tuple[int, ...] = ()
    classes: int = 2
    horizon: int = 0  # > 0: self-supervised forecast of the target this many steps ahead
    lags: int = 0


def stream_specs(n: int) -> dict[str, BenchStream]:
    third, quarter = n // 3, n // 4
    return {
        "friedman_abrupt": BenchStream("friedman_abrupt", "regression", n, (third, 2 * third)),
        "friedman_gradual": BenchStream("friedman_gradual", "regression", n, (third, 2 * third)),
        "friedman_local": BenchStream("friedman_local", "regression", n, (quarter, 2 * quarter, 3 * quarter)),
        "hyperplane": BenchStream("hyperplane", "binary", n),
        "sea": BenchStream("sea", "binary", n, (n // 2,)),
        "agrawal": BenchStream("agrawal", "binary", n, (n // 2,)),
        "rbf": BenchStream("rbf", "multiclass", n, classes=3),
        "trump": BenchStream("trump", "regression", 1001),
        "phishing": BenchStream("phishing", "binary", 1250),
        "waterflow": BenchStream("waterflow", "regression", 1268, horizon=1, lags=3),
    }


def samples(spec: BenchStream, seed: int) -> Iterator[tuple[list[float], float]]:
    """``(feature values, target)`` pairs of a stream; targets are floats or class indices."""
    from river import datasets
    from river.datasets import synth

    s = spec.drifts
    source: Iterable[tuple[dict[str, Any], Any]]
    if spec.name == "friedman_abrupt":
        source = synth.FriedmanDrift(drift_type="gra", position=s, seed=seed)
    elif spec.name == "friedman_gradual":
        source = synth.FriedmanDrift(drift_type="gsg", position=s, transition_window=500, seed=seed)
    elif spec.name == "friedman_local":
        source = synth.FriedmanDrift(drift_type="lea", position=s, seed=seed)
    elif spec.name == "hyperplane":
        source = synth.Hyperplane(seed=seed, n_features=10, n_drift_features=5, mag_change=0.001,
                                  noise_percentage=0.05)
    elif spec.name == "sea":
        # an abrupt concept drift stream; river's ConceptDriftStream overflows math.exp with width=1
        source = itertools.chain(itertools.islice(synth.SEA(variant=0, seed=seed), s[0]),
                                 synth.SEA(variant=2, seed=seed + 1))
    elif spec.name == "agrawal":
        source = itertools.chain(itertools.islice(synth.Agrawal(classification_function=0, seed=seed), s[0]),
                                 synth.Agrawal(classification_function=2, seed=seed + 1))
    elif spec.name == "rbf":
        source = synth.RandomRBFDrift(seed_model=seed, seed_sample=seed + 1, n_classes=3, n_features=10,
                                      n_centroids=50, change_speed=0.001, n_drift_centroids=50)
    elif spec.name == "trump":
        source = datasets.TrumpApproval()
    elif spec.name == "phishing":
        source = datasets.Phishing()
    elif spec.name == "waterflow":
        source = (({"flow": float(y)}, float(y)) for _, y in datasets.WaterFlow())
    else:
        raise ValueError(f"unknown stream {spec.name!r}")
    for x, y in itertools.islice(source, spec.n):
        values = [float(v) for v in x.values()]
        yield values, float(int(y)) if spec.task != "regression" else float(y)


# -- models --------------------------------------------------------------------------------


class Model(abc.ABC):
    """``predict(values) -> (prediction, memo)``; later ``learn(memo, y, prediction)``.

    The memo is what the model needs to learn from that reading once its target is
    known (the scaled feature vector for a streamlearn slot, the raw values for river).
    """

    @abc.abstractmethod
    def predict(self, values: list[float]) -> tuple[Any, Any]: ...

    @abc.abstractmethod
    def learn(self, memo: Any, y: float, prediction: Any) -> None: ...


class SlotModel(Model):
    """A streamlearn model slot, exactly as the agent runs it."""

    def __init__(self, spec: BenchStream, n_features: int, schedule: dict[str, Any], lr: float,
                 seed: int, optimizer: str = "sgd", drift: dict[str, Any] | None = None) -> None:
        from streamlearn.config import parse_config
        from streamlearn.stream import Slot

        features = [f"f{i}" for i in range(n_features)]
        stream: dict[str, Any] = {
            "name": "bench", "topic": "bench", "features": features, "task": spec.task,
            "label": {"field": "y"}, "lags": spec.lags,
            "model": {"kind": "mlp", "hidden": [32, 32], "seed": seed},
            "optimizer": {"name": optimizer, "lr": lr, "clip_norm": 1.0},
            "schedule": schedule, "drift": drift or {},
        }
        if spec.task == "multiclass":
            stream["classes"] = list(range(spec.classes))
        self.slot = Slot("bench", parse_config({"streams": [stream]}).streams[0])

    def predict(self, values: list[float]) -> tuple[Any, Any]:
        x = self.slot.features_for("d", values)
        return self.slot.predict(x), x

    def learn(self, memo: Any, y: float, prediction: Any) -> None:
        self.slot.learn(memo, y, prediction)


class RiverModel(Model):
    def __init__(self, spec: BenchStream, kind: str, seed: int) -> None:
        from river import dummy, forest, linear_model, preprocessing, stats

        self.task = spec.task
        self._last = 0.0
        if kind == "linear":
            inner = (linear_model.LinearRegression() if spec.task == "regression"
                     else linear_model.LogisticRegression() if spec.task == "binary"
                     else linear_model.SoftmaxRegression())
            self.model: Any = preprocessing.StandardScaler() | inner
        elif kind == "arf":
            self.model = forest.ARFRegressor(seed=seed) if spec.task == "regression" else forest.ARFClassifier(seed=seed)
        elif kind == "mean":
            self.model = dummy.StatisticRegressor(stats.Mean())
        elif kind == "majority":
            self.model = dummy.PriorClassifier()
        elif kind == "last":
            self.model = None
        else:
            raise ValueError(f"unknown river baseline {kind!r}")
        self.kind = kind

    def predict(self, values: list[float]) -> tuple[Any, Any]:
        if self.kind == "last":
            return self._last, values
        x = dict(enumerate(values))
        if self.task == "regression":
            return float(self.model.predict_one(x) or 0.0), x
        p = self.model.predict_one(x)
        return (0 if p is None else int(p)), x

    def learn(self, memo: Any, y: float, prediction: Any) -> None:
        if self.kind == "last":
            self._last = y
            return
        self.model.learn_one(memo, y if self.task == "regression" else int(y))


def predicted_class(task: str, prediction: Any) -> int:
    if task == "binary" and isinstance(prediction, (float, np.floating)):
        return int(prediction > 0.5)
    if task == "multiclass" and isinstance(prediction, np.ndarray):
        return int(np.argmax(prediction))
    return int(prediction)


def prequential(spec: BenchStream, model: Model, seed: int) -> np.ndarray:
    """Per-sample errors of ``model`` on ``spec``: predict, then learn.

    For a forecast stream the target of a reading is the value ``horizon`` readings
    later, so it is learned then (as the agent's ``forecast`` label source does).
    """
    errors = []
    waiting: deque[tuple[Any, Any]] = deque()
    for values, y in samples(spec, seed):
        if spec.horizon:
            if len(waiting) == spec.horizon:
                memo, old_pred = waiting.popleft()
                errors.append(abs(y - float(old_pred)))
                model.learn(memo, y, old_pred)
            pred, memo = model.predict(values)
            waiting.append((memo, pred))
            continue
        pred, memo = model.predict(values)
        if spec.task == "regression":
            errors.append(abs(y - float(pred)))
        else:
            errors.append(float(predicted_class(spec.task, pred) != int(y)))
        model.learn(memo, y, pred)
    return np.asarray(errors)


# -- what is compared -------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One model to compare: ``kind`` is ``slot`` (a streamlearn model) or a river baseline."""

    name: str
    family: str  # "policy", "fixed", "river", "naive"
    kind: str
    schedule: tuple[tuple[str, Any], ...] = ()
    lr: float = 0.01

    def build(self, spec: BenchStream, n_features: int, seed: int) -> Model:
        if self.kind == "slot":
            return SlotModel(spec, n_features, dict(self.schedule), self.lr, seed)
        kind = self.kind
        if kind == "naive":
            kind = "mean" if spec.task == "regression" else "majority"
        return RiverModel(spec, kind, seed)


def contenders(policies: dict[str, dict[str, Any]], grid: tuple[float, ...], river: bool,
               base_lr: float | None = None) -> list[Contender]:
    """Policies run at the configured default rate (``[streams.optimizer] lr``) unless a
    policy entry gives its own ``lr``."""
    if base_lr is None:
        from streamlearn.config import OptimizerConfig

        base_lr = OptimizerConfig().lr
    out = [Contender(name, "policy", "slot", tuple(sorted((k, v) for k, v in schedule.items() if k != "lr")),
                     float(schedule.get("lr", base_lr)))
           for name, schedule in policies.items()]
    out += [Contender(f"fixed {lr:g}", "fixed", "slot", (("policy", "constant"),), lr) for lr in grid]
    if river:
        out.append(Contender("river linear", "river", "linear"))
        out.append(Contender("river ARF", "river", "arf"))
    out.append(Contender("naive mean|majority", "naive", "naive"))
    out.append(Contender("naive last value", "naive", "last"))
    return out


DEFAULT_POLICIES: dict[str, dict[str, Any]] = {
    "constant": {"policy": "constant"},
    "decay": {"policy": "decay"},
    "drift_reset": {"policy": "drift_reset"},
    "plateau": {"policy": "plateau"},
    "hypergradient": {"policy": "hypergradient"},
    "dog": {"policy": "dog"},
    "population": {"policy": "population"},
}


@dataclass
class RunResult:
    stream: str
    contender: str
    family: str
    seed: int
    error: float
    after_drift: float | None
    recover: float | None
    seconds: float


def drift_figures(errors: np.ndarray, drifts: tuple[int, ...], window: int) -> tuple[float | None, float | None]:
    """Mean error in ``window`` samples after each drift; samples until the rolling error recovers."""
    if not drifts:
        return None, None
    after, recover = [], []
    rolling = np.convolve(errors, np.ones(100) / 100, mode="full")[: len(errors)]
    for d in drifts:
        if d >= len(errors):
            continue
        after.append(float(errors[d:d + window].mean()))
        before = float(errors[max(0, d - window):d].mean())
        target = before * 1.1 + 1e-12
        later = np.nonzero(rolling[d + 100:] <= target)[0]
        recover.append(float(later[0] + 100) if len(later) else float(len(errors) - d))
    return (statistics.fmean(after) if after else None, statistics.fmean(recover) if recover else None)


def _load_models() -> None:
    """Import everything a worker will run at its start, so the whole run uses one version."""
    import river.datasets  # noqa: F401
    import river.forest  # noqa: F401

    import streamlearn.stream  # noqa: F401


def _run_one(job: tuple[BenchStream, Contender, int, int]) -> RunResult:
    spec, contender, seed, window = job
    n_features = len(next(iter(samples(spec, seed)))[0])
    start = time.perf_counter()
    errors = prequential(spec, contender.build(spec, n_features, seed), seed)
    after, recover = drift_figures(errors, spec.drifts, window)
    return RunResult(spec.name, contender.name, contender.family, seed, float(errors.mean()), after, recover,
                     time.perf_counter() - start)


@dataclass
class Report:
    results: list[RunResult]
    streams: list[str]
    contenders: list[Contender]
    seeds: list[int]
    default: str
    summary: dict[str, Any] = field(default_factory=dict)


def run_accuracy(streams: list[str] | None = None, seeds: list[int] | None = None, n: int = 10_000,
                 policies: dict[str, dict[str, Any]] | None = None, grid: tuple[float, ...] = FIXED_GRID,
                 river: bool = True, default: str = "population", workers: int | None = None,
                 window: int = 500, progress: Callable[[int, int], None] | None = None) -> Report:
    """Run every contender on every stream and seed (in parallel processes)."""
    specs = stream_specs(n)
    names = streams or list(specs)
    unknown = set(names) - set(specs)
    if unknown:
        raise ValueError(f"unknown streams {sorted(unknown)}; choose from {sorted(specs)}")
    seeds = seeds or [0, 1, 2]
    cons = contenders(policies or DEFAULT_POLICIES, grid, river)
    # the slow ones first, so the pool's tail is short
    jobs = [(specs[s], c, seed, window) for c in sorted(cons, key=lambda c: c.family != "river")
            for s in names for seed in seeds]
    results: list[RunResult] = []
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers == 1:
        for i, job in enumerate(jobs):
            results.append(_run_one(job))
            if progress:
                progress(i + 1, len(jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_load_models) as pool:
            for i, result in enumerate(pool.map(_run_one, jobs, chunksize=1)):
                results.append(result)
                if progress:
                    progress(i + 1, len(jobs))
    report = Report(results, names, cons, seeds, default)
    report.summary = summarise(report)
    return report


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def summarise(report: Report) -> dict[str, Any]:
    """Per stream: mean error of each contender over seeds, the best fixed rate, the verdict."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for s in report.streams:
        table[s] = {}
        for c in report.contenders:
            rows = [r for r in report.results if r.stream == s and r.contender == c.name]
            after = [r.after_drift for r in rows if r.after_drift is not None]
            recover = [r.recover for r in rows if r.recover is not None]
            table[s][c.name] = {
                "error": _mean([r.error for r in rows]),
                "error_sd": statistics.pstdev([r.error for r in rows]) if len(rows) > 1 else 0.0,
                "after_drift": _mean(after) if after else None,
                "recover": _mean(recover) if recover else None,
                "seconds": _mean([r.seconds for r in rows]),
            }
    verdicts = {}
    for s, row in table.items():
        fixed = {k: v["error"] for k, v in row.items() if k.startswith("fixed ")}
        best_fixed = min(fixed, key=lambda k: fixed[k])
        mine = row[report.default]["error"]
        bar = fixed[best_fixed]
        linear = row.get("river linear", {}).get("error")
        verdicts[s] = {
            "best_fixed": best_fixed, "best_fixed_error": bar, "default_error": mine,
            "ratio": mine / bar if bar else math.nan,
            "at_or_below": mine <= bar, "within_5pct": mine <= 1.05 * bar,
            "below_linear": None if linear is None else mine < linear,
        }
    return {"table": table, "verdicts": verdicts,
            "at_or_below": sum(v["at_or_below"] for v in verdicts.values()),
            "within_5pct": sum(v["within_5pct"] for v in verdicts.values()),
            "below_linear": sum(bool(v["below_linear"]) for v in verdicts.values()),
            "n_streams": len(verdicts)}


def markdown(report: Report) -> str:
    """The headline table: prequential error per stream and contender (mean over seeds)."""
    t = report.summary["table"]
    policy_names = [c.name for c in report.contenders if c.family == "policy"]
    cols = policy_names + ["best fixed (rate)", "river linear", "river ARF", "naive"]
    lines = ["| stream | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in report.streams:
        row = t[s]
        v = report.summary["verdicts"][s]
        cells = []
        best_policy = min(policy_names, key=lambda p: row[p]["error"])
        for p in policy_names:
            text = f"{row[p]['error']:.4g}"
            cells.append(f"**{text}**" if p == best_policy else text)
        cells.append(f"{v['best_fixed_error']:.4g} ({v['best_fixed'].split()[1]})")
        for name in ("river linear", "river ARF"):
            cells.append(f"{row[name]['error']:.4g}" if name in row else "-")
        naive = [row[k]["error"] for k in row if k.startswith("naive")]
        cells.append(f"{min(naive):.4g}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    s = report.summary
    lines.append("")
    lines.append(
        f"Default policy `{report.default}`: at or below the best fixed rate on {s['at_or_below']} of "
        f"{s['n_streams']} streams, within 5% on {s['within_5pct']}, below river's linear model on "
        f"{s['below_linear']}."
    )
    drift_lines = ["", "| stream | contender | error after drift | samples to recover |", "|---|---|---|---|"]
    for st in report.streams:
        if not stream_specs(10).get(st, BenchStream(st, "", 0)).drifts:
            continue
        fixed_best = report.summary["verdicts"][st]["best_fixed"]
        for name in (report.default, fixed_best, "river linear", "river ARF"):
            cell = t[st].get(name)
            if cell and cell["after_drift"] is not None:
                drift_lines.append(f"| {st} | {name} | {cell['after_drift']:.4g} | {cell['recover']:.0f} |")
    return "\n".join(lines + drift_lines)


def write_reports(report: Report, out_dir: Path) -> dict[str, Path]:
    import orjson

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "bench-accuracy.md", "csv": out_dir / "bench-accuracy.csv",
             "json": out_dir / "bench-accuracy.json"}
    paths["md"].write_text(markdown(report) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stream", "contender", "family", "seed", "error", "after_drift", "recover", "seconds"])
        for r in report.results:
            w.writerow([r.stream, r.contender, r.family, r.seed, r.error, r.after_drift, r.recover, round(r.seconds, 2)])
    paths["json"].write_bytes(orjson.dumps({"summary": report.summary, "seeds": report.seeds,
                                            "default": report.default}, option=orjson.OPT_INDENT_2))
    return paths
