"""``streamlearn plot``: one PNG per stream of loss, learning rate and drift markers.

matplotlib is an optional dependency (``pip install 'streamlearn[plot]'``); the
agent itself never imports it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from streamlearn.errors import StreamlearnError
from streamlearn.store import reader


def plot_streams(store: Path, out_dir: Path, stream: str | None = None) -> list[Path]:
    """Write ``<out_dir>/<stream>.png`` for each stream (or one); returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamlearnError("plotting needs matplotlib: pip install 'streamlearn[plot]'") from None
    conn = reader.open_readonly(store)
    names = [stream] if stream else [r[0] for r in conn.execute("SELECT DISTINCT stream FROM metrics ORDER BY 1")]
    if not names:
        raise StreamlearnError(f"{store}: no metrics yet (the agent writes them at each checkpoint)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        history = reader.metrics_history(conn, name)
        if not history:
            raise StreamlearnError(f"{store}: no metrics for stream {name!r}")
        events = reader.drift_events(conn, stream=name)
        times = [dt.datetime.fromtimestamp(h["at"]) for h in history]
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), constrained_layout=True)
        ax_loss.plot(times, [h["error"] for h in history], label="error (moving average)")
        ax_loss.plot(times, [h["baseline_error"] for h in history], label="predict-the-mean baseline",
                     linestyle="--", alpha=0.7)
        ax_loss.set_ylabel("error")
        ax_loss.set_title(f"stream {name}: {history[-1]['labelled']} labelled readings, "
                          f"{sum(1 for e in events if e['detector'] != 'policy')} drifts")
        ax_lr.plot(times, [h["lr"] for h in history], color="tab:green", label="learning rate (mean over models)")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate")
        drift_times = [dt.datetime.fromtimestamp(e["at"]) for e in events if e["detector"] != "policy"]
        for i, when in enumerate(drift_times):
            for ax in (ax_loss, ax_lr):
                ax.axvline(when, color="tab:red", alpha=0.5, linewidth=1,
                           label="drift detected" if (i == 0 and ax is ax_loss) else None)
        ax_loss.legend(loc="upper right")
        ax_lr.legend(loc="upper right")
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
