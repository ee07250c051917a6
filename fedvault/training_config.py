"""The federation-wide training configuration, validated before anything starts.

One frozen pydantic model read from a TOML file and/or CLI options. A bad value
fails with pydantic's error path (``rounds: Input should be greater than or
equal to 1``) translated into :class:`~fedvault.errors.ConfigError`, before any
process is started or any privacy is spent.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fedvault.errors import ConfigError
from fedvault.schema import BUILTIN_DATASETS

# A built-in demo table (fedvault/schemas/NAME.toml), or the name of the
# table a schema file describes.
DatasetName = str
ModelKind = Literal["logreg", "mlp"]
Activation = Literal["square", "relu", "quad"]
Aggregation = Literal["fedavg", "median", "trimmed-mean"]


class TrainingConfig(BaseModel):
    """Hyperparameters and privacy targets of one federated run.

    Defaults are the softmax-regression settings tuned by ``bench/dp_utility.py``
    (on seeds disjoint from the reported ones) for the default target ε = 3:
    full-batch DP-GD (a batch size above any partner's n makes q = 1), tight
    clipping (every example clipped, so only learning_rate · max_grad_norm matters).
    """

    # strict: TOML and JSON are typed, so `rounds = true` or `rounds = "5"` is a
    # mistake to point at, not a value to coerce (lax pydantic made true a 1).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    schema_file: str | None = Field(
        default=None,
        alias="schema",
        description="Path of the federation's schema.toml (relative to the config file).",
    )
    dataset: DatasetName = Field(
        default="digits",
        min_length=1,
        max_length=128,
        description="A built-in table, or (set from it) the name of the schema file's table.",
    )
    model: ModelKind = "logreg"
    loss: Literal["squared", "huber"] = Field(
        default="squared",
        description="Regression loss on the target rescaled into [-1, 1] (ignored otherwise).",
    )
    huber_delta: float = Field(default=0.1, gt=0, le=2)
    hidden: int = Field(default=32, ge=1, le=4096)
    activation: Activation = "square"
    quad_alpha: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="α of the 'quad' activation z + α·z² (mlp only; ignored otherwise).",
    )
    rounds: int = Field(default=5, ge=1, le=10_000)
    local_steps: int = Field(default=16, ge=1, le=100_000)
    batch_size: int = Field(default=100_000, ge=1, le=1_000_000)
    learning_rate: float = Field(default=20.0, gt=0, le=100)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    max_grad_norm: float = Field(default=0.1, gt=0)
    private: bool = Field(
        default=True,
        description=(
            "False trains without DP: only for measured baselines, never for partners' data."
        ),
    )
    target_epsilon: float = Field(default=3.0, gt=0, le=100)
    delta: float = Field(default=1e-5, gt=0, lt=0.01)
    federation_epsilon_budget: float | None = Field(default=None, gt=0)
    stats_noise_multiplier: float = Field(default=6.0, gt=0)
    aggregation: Aggregation = "fedavg"
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)
    min_partners: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=120.0, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**31)
    secure_mode: bool = False

    @field_validator("dataset")
    @classmethod
    def _known_table(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("schema_file") is None and value not in BUILTIN_DATASETS:
            raise ValueError(
                "not a built-in table ("
                + ", ".join(BUILTIN_DATASETS)
                + "); for a table of your own set schema = 'path/to/schema.toml'"
            )
        return value

    @property
    def epsilon_budget(self) -> float:
        """The coordinator's per-partner cap for this run (defaults to the target)."""
        return (
            self.federation_epsilon_budget
            if self.federation_epsilon_budget is not None
            else self.target_epsilon
        )


def load_training_config(path: Path | None = None, **overrides: Any) -> TrainingConfig:
    """Read ``path`` (TOML, optional ``[training]`` table) and apply CLI overrides.

    A ``schema`` file is resolved against the config file's directory, read and
    checked here (a draft or a bad file fails before anything starts), and
    names the run's ``dataset``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        table = raw.get("training", raw)
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [training] must be a table")
        data.update(table)
    data.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    if "schema_file" in data:
        data["schema"] = data.pop("schema_file")
    if isinstance(data.get("schema"), str) and data["schema"]:
        schema_path = Path(data["schema"]).expanduser()
        if path is not None and not schema_path.is_absolute() and "schema" not in overrides:
            schema_path = path.parent / schema_path
        data["schema"] = str(schema_path.resolve())
        from fedvault.schema import load_schema

        data["dataset"] = load_schema(schema_path).name
    return validate_training_config(data, source=str(path) if path else "options")


def training_schema(config: TrainingConfig) -> Any:
    """The run's :class:`~fedvault.schema.DataSchema`: its file, or the built-in table's."""
    from fedvault.schema import builtin_schema, load_schema

    if config.schema_file:
        schema = load_schema(config.schema_file)
        if schema.name != config.dataset:
            raise ConfigError(
                f"schema file {config.schema_file} describes table {schema.name!r}, "
                f"not {config.dataset!r}"
            )
        return schema
    return builtin_schema(config.dataset)


def validate_training_config(data: dict[str, Any], *, source: str) -> TrainingConfig:
    """Validate a mapping, naming the offending field in the error."""
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Render pydantic errors as ``source: field: message`` lines, without input values."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{source}: {field}: {err['msg']}")
    return "invalid configuration\n" + "\n".join(lines)
