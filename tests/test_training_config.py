"""fedvault.training_config: validation, TOML loading and CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedvault.errors import ConfigError
from fedvault.training_config import (
    TrainingConfig,
    load_training_config,
    validate_training_config,
)


def test_defaults_are_valid() -> None:
    cfg = load_training_config()
    assert cfg == TrainingConfig()
    assert cfg.private is True
    assert cfg.epsilon_budget == cfg.target_epsilon
    assert validate_training_config({}, source="test") == cfg


def test_federation_budget_overrides_the_target() -> None:
    cfg = validate_training_config(
        {"target_epsilon": 2.0, "federation_epsilon_budget": 5.0}, source="t"
    )
    assert cfg.epsilon_budget == 5.0


def test_config_is_frozen() -> None:
    cfg = TrainingConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.rounds = 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rounds", 0),
        ("rounds", 10_001),
        ("delta", 0.5),
        ("delta", 0.0),
        ("aggregation", "mean"),
        ("learning_rate", 0.0),
        ("momentum", 1.0),
        ("trim_fraction", 0.5),
        ("target_epsilon", -1.0),
        ("dataset", "mnist"),
        ("model", "cnn"),
        ("activation", "tanh"),
        ("quad_alpha", 0.0),
        ("seed", -1),
        ("batch_size", "many"),
        ("not_a_setting", 1),
    ],
)
def test_bad_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        validate_training_config({field: value}, source="cfg.toml")
    message = str(info.value)
    assert f"cfg.toml: {field}:" in message
    # Input values are not echoed (they could be anything the user typed).
    if isinstance(value, str):
        assert repr(value) not in message


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        validate_training_config({"rounds": 0, "delta": 0.5}, source="options")
    assert "options: rounds:" in str(info.value)
    assert "options: delta:" in str(info.value)


def test_toml_training_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text(
        '[training]\ndataset = "breast-cancer"\nmodel = "mlp"\nrounds = 3\n'
        'aggregation = "trimmed-mean"\ndelta = 1e-6\n',
        encoding="utf-8",
    )
    cfg = load_training_config(path)
    assert (cfg.dataset, cfg.model, cfg.rounds, cfg.aggregation, cfg.delta) == (
        "breast-cancer",
        "mlp",
        3,
        "trimmed-mean",
        1e-6,
    )
    assert cfg.batch_size == TrainingConfig().batch_size


def test_toml_without_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "flat.toml"
    path.write_text("rounds = 7\n", encoding="utf-8")
    assert load_training_config(path).rounds == 7


def test_overrides_win_and_none_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text("[training]\nrounds = 3\nlocal_steps = 11\n", encoding="utf-8")
    cfg = load_training_config(path, rounds=9, local_steps=None, batch_size=None)
    assert (cfg.rounds, cfg.local_steps, cfg.batch_size) == (9, 11, TrainingConfig().batch_size)
    cfg = load_training_config(None, **{"learning-rate": 0.1, "seed": None})
    assert (cfg.learning_rate, cfg.seed) == (0.1, 0)


def test_bad_value_in_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text("[training]\nrounds = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="rounds") as info:
        load_training_config(path)
    assert str(path) in str(info.value)


def test_bad_override_names_options() -> None:
    with pytest.raises(ConfigError, match="options: aggregation:"):
        load_training_config(aggregation="mean")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_training_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"[training\nrounds = 3\n", b"rounds = = 3\n", b"\xff\xfe not utf-8"],
)
def test_invalid_toml(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_training_config(path)
    assert str(path) in str(info.value)


def test_training_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "odd.toml"
    path.write_text('training = "fast"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a table") as info:
        load_training_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("rounds", "true"), ("rounds", '"5"'), ("private", '"yes"')]
)
def test_a_value_of_the_wrong_toml_type_is_refused_not_coerced(
    tmp_path: Path, field: str, value: str
) -> None:
    """Lax validation turned `rounds = true` into one round."""
    path = tmp_path / "train.toml"
    path.write_text(f"[training]\n{field} = {value}\n")
    with pytest.raises(ConfigError, match=field):
        load_training_config(path)
