"""Figures of the fault tests, written to ``reports/faults.json`` and ``reports/faults.md``.

Each fault test gets a :class:`FaultReport` (the ``report`` fixture). It records
figures (counts lost / twice / once, times, sizes) as it goes, and checks the
issue's requirements with :meth:`FaultReport.expect` instead of a bare
``assert``: every requirement is evaluated and recorded even when an earlier one
failed, and :meth:`FaultReport.verify` fails the test at the end listing every
requirement that was not met. After each test the conftest merges its entry into
the JSON file (keyed by test id, so running one module updates only its entries)
and regenerates the markdown summary from the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Expectation:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class FaultReport:
    """What one fault test measured and which requirements held."""

    nodeid: str
    title: str
    figures: dict[str, Any] = field(default_factory=dict)
    expectations: list[Expectation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outcome: str = "not run"
    duration_s: float | None = None
    headline: str = ""

    def figure(self, key: str, value: Any) -> Any:
        """Record one figure (JSON-able) and return it."""
        self.figures[key] = _jsonable(value)
        return value

    def add(self, **figures: Any) -> None:
        for key, value in figures.items():
            self.figure(key, value)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def expect(self, what: str, ok: bool, detail: Any = "") -> bool:
        """Check one requirement; the test fails at :meth:`verify` if any did not hold."""
        self.expectations.append(Expectation(what, bool(ok), "" if ok else str(detail)[:2000]))
        return bool(ok)

    @property
    def failed(self) -> list[Expectation]:
        return [e for e in self.expectations if not e.ok]

    def verify(self) -> None:
        failed = self.failed
        if failed:
            lines = [f"{len(failed)} of {len(self.expectations)} requirements not met:"]
            lines += [f"  - {e.what}: {e.detail}" for e in failed]
            raise AssertionError("\n".join(lines))

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "headline": self.headline,
            "outcome": self.outcome,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 2),
            "figures": self.figures,
            "requirements": [{"what": e.what, "ok": e.ok, "detail": e.detail} for e in self.expectations],
            "notes": self.notes,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def write_reports(report: FaultReport, root: Path) -> Path:
    """Merge one test's entry into ``root/reports/faults.json`` and rewrite ``faults.md``."""
    out_dir = root / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "faults.json"
    data: dict[str, Any] = {}
    if json_path.exists():
        try:
            data = json.loads(json_path.read_text())
        except (OSError, ValueError):
            data = {}
    data.setdefault("tests", {})
    data["tests"][report.nodeid] = report.as_dict()
    data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    data["git_commit"] = _git_commit(root)
    data["machine"] = _machine()
    data["reproduce"] = "python -m pytest tests/faults -m faults"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    tmp.replace(json_path)
    (out_dir / "faults.md").write_text(render_markdown(data))
    return json_path


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


# the order of the fault list in issue 4
ORDER = ["test_kill9", "test_replay_equivalence", "test_long_outage", "test_session", "test_broker_restart",
         "test_network", "test_hostile_input", "test_numeric_poisoning", "test_store_faults", "test_readers",
         "test_single_agent"]


def _order(nodeid: str) -> tuple[int, str]:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return (ORDER.index(module) if module in ORDER else len(ORDER), nodeid)


def render_markdown(data: dict[str, Any]) -> str:
    tests: dict[str, Any] = dict(sorted(data.get("tests", {}).items(), key=lambda kv: _order(kv[0])))
    lines = [
        "# streamlearn fault-injection report",
        "",
        f"Updated {data.get('updated_at')}, commit `{data.get('git_commit')}`, "
        f"{data.get('machine', {}).get('cpus')} CPUs, Python {data.get('machine', {}).get('python')}.",
        f"Reproduce: `{data.get('reproduce')}` (writes this file and `faults.json`).",
        "",
        "| test | outcome | duration (s) | requirements met | key figures |",
        "|---|---|---|---|---|",
    ]
    for nodeid, t in tests.items():
        reqs = t.get("requirements", [])
        met = sum(1 for r in reqs if r["ok"])
        key = t.get("figures", {})
        headline = ", ".join(f"{k} {_short(key[k])}" for k in ("published", "lost", "twice") if k in key)
        if t.get("headline"):
            headline = f"{headline}; {t['headline']}" if headline else t["headline"]
        lines.append(
            f"| `{nodeid.split('/')[-1]}` | {t.get('outcome')} | {t.get('duration_s')} | {met}/{len(reqs)} | {headline} |"
        )
    for nodeid, t in tests.items():
        lines += ["", f"## {nodeid}", "", t.get("title", ""), ""]
        lines.append(f"Outcome: **{t.get('outcome')}** in {t.get('duration_s')} s.")
        lines.append("")
        for r in t.get("requirements", []):
            mark = "ok" if r["ok"] else "FAILED"
            lines.append(f"- [{mark}] {r['what']}" + (f": {r['detail']}" if r["detail"] else ""))
        if t.get("figures"):
            lines += ["", "| figure | value |", "|---|---|"]
            for k, v in t["figures"].items():
                lines.append(f"| {k} | {_short(v).replace('|', '/')} |")
        for n in t.get("notes", []):
            lines.append(f"\nNote: {n}")
    lines.append("")
    return "\n".join(lines)
