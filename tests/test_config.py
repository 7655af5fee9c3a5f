"""Config validation: every error names the key path and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlearn.config import load_config, parse_config
from streamlearn.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def minimal(**stream: object) -> dict:
    s = {"name": "s", "topic": "a/+/b", "features": ["x", "y"], "label": {"field": "t"}}
    s.update(stream)
    return {"streams": [s]}


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_the_issue_example_names_path_and_value() -> None:
    assert error_of(minimal(features=["a", "b", 3])) == "streams[0].features[2]: expected a field name, got 3"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(featurs=["x"]), "streams[0].featurs: unknown key (did you mean 'features'?)"),
        ({"streams": []}, "streams: list should have at least 1 item after validation, not 0, got []"),
        (minimal(topic="a/b#"), "streams[0].topic: '#' must be a whole topic level and the last one, got 'a/b#'"),
        (minimal(task="multiclass"), "streams[0]: task 'multiclass' needs at least two classes"),
        (minimal(optimizer={"lr": 0}), "streams[0].optimizer.lr: input should be greater than 0, got 0"),
        (minimal(label={"source": "topic", "field": "t"}), "streams[0].label: source 'topic' needs label.topic"),
        (minimal(label={"field": "x"}), "streams[0]: the label field 'x' is also a feature"),
        ({**minimal(), "mqtt": {"port": 70000}}, "mqtt.port: input should be less than or equal to 65535, got 70000"),
        ({**minimal(), "mqtt": {"protocol": "4"}}, "mqtt.protocol: input should be '5' or '3.1.1', got '4'"),
        (minimal(name="a/b"), "streams[0].name: expected a name of letters, digits, '_', '-' or '.' "
                              "(at most 64, no '/', '+' or '#'), got 'a/b'"),
    ],
)
def test_errors_name_the_key(data: dict, expected: str) -> None:
    assert expected in error_of(data).splitlines()


def test_every_problem_is_reported_at_once() -> None:
    lines = error_of({"streams": [{"name": "s", "topic": "+/x", "features": [1, 2], "label": {"field": "t"}}]})
    assert lines.splitlines() == [
        "streams[0].features[0]: expected a field name, got 1",
        "streams[0].features[1]: expected a field name, got 2",
    ]


def test_defaults_are_real() -> None:
    cfg = parse_config(minimal())
    assert cfg.mqtt.protocol == "5" and cfg.mqtt.session_expiry > 0
    assert cfg.client_id == "streamlearn-gateway"
    assert cfg.store.synchronous == "full"
    assert cfg.streams[0].model.hidden == [32, 32]


def test_file_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_relative_store_path_resolves_against_the_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[store]\npath = "data/x.db"\n[[streams]]\nname="s"\ntopic="a"\nfeatures=["x"]\nlabel={field="t"}\n')
    assert load_config(path).store.path == tmp_path / "data" / "x.db"


@pytest.mark.parametrize("example", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_validate(example: Path) -> None:
    cfg = load_config(example)
    assert cfg.streams
