"""Privacy arithmetic shared by partner nodes and the coordinator.

Both sides must compute *the same* ε for the same charges, or their ledgers
could never agree; so this module is the one place where (ε, δ) is derived.

Accountant: Rényi DP (Mironov 2017; the sampled Gaussian mechanism analysis of
Mironov, Talwar & Zhang 2019) as implemented by Opacus' ``analysis.rdp``, over
Opacus' default orders. Each charge is a sampled Gaussian mechanism
(noise multiplier sigma, Poisson sampling rate q, number of steps); a partner's
lifetime ε at δ is the RDP composition of *every* charge ever made against its
dataset, converted to (ε, δ) once. Adjacency: add/remove one example of that
partner's dataset (example-level DP per partner).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

from fedvault.errors import ConfigError

ACCOUNTANT_NAME = "rdp"
# Opacus' default RDP orders (fine near 1 for large ε), extended upwards so that
# weakly-noised or heavily-noised single releases still find their optimal order.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(12, 64)]
    + [64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 1024.0]
)

MECHANISM_DP_SGD = "dp-sgd"
MECHANISM_GAUSSIAN_SUMS = "gaussian-sums"
MECHANISM_NON_PRIVATE = "non-private"


def poisson_sample_rate(batch_size: int, n: int) -> float:
    """The sampling rate Opacus' ``DPDataLoader`` really uses: ``1 / ceil(n / B)``.

    Opacus derives it from the length of the wrapped loader, not from ``B / n``;
    partner and coordinator both charge *this* value so the ledger describes
    exactly the mechanism that ran.
    """
    if n < 1 or batch_size < 1:
        raise ConfigError("sample rate needs a non-empty dataset and a positive batch size")
    return 1.0 / math.ceil(n / batch_size)


def accountant_version() -> str:
    """Version string recorded with every charge so a ledger can be re-derived."""
    return f"opacus-{version('opacus')}"


@dataclass(frozen=True, slots=True)
class GaussianEvent:
    """``steps`` compositions of a Gaussian mechanism sampled at rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError("noise_multiplier must be positive and finite")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError("sample_rate must be in (0, 1]")
        if self.steps < 1:
            raise ConfigError("steps must be at least 1")


@dataclass(frozen=True, slots=True)
class PrivacyCharge:
    """One ledger row: what was released, under which mechanism, and ε after it."""

    run_id: str
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    accountant_version: str
    epsilon_after: float

    @property
    def event(self) -> GaussianEvent | None:
        """The accounted mechanism, or None for a non-private release (ε = ∞)."""
        if self.mechanism == MECHANISM_NON_PRIVATE:
            return None
        return GaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, str | int | float]:
        return asdict(self)


@functools.cache
def _opacus_rdp() -> ModuleType:
    """Opacus' RDP analysis module, loaded without importing the ``opacus`` package.

    Why go around the package: ``import opacus`` imports torch and all of its DP
    machinery (~2.7 s here), and every node checks its ledger in a fresh
    ClientApp process each round, while the analysis module itself needs only
    NumPy and SciPy. Loading that one file by path runs Opacus' accountant
    code unchanged (a test compares it with the normally imported module).
    """
    package = importlib.util.find_spec("opacus")  # locates, does not execute
    if package is None or package.origin is None:
        raise ConfigError("opacus is not installed; it provides the RDP accountant")
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("fedvault._opacus_rdp", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load Opacus' RDP accountant from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# One step's RDP curve per (σ, q), memoised for the life of the process.
# Why: Opacus' compute_rdp evaluates a Python series per fractional order, so a
# sampled (q < 1) mechanism costs 0.1–0.7 s here, and the same (σ, q) recurs on
# every message: a partner keeps its σ and sampling rate for a whole run, the
# node checks its ledger twice per release (lifetime and run ε), and the
# coordinator projects every partner's ε before every round. Recomputing it
# made a 10-partner simulated round cost seconds per partner. The cache holds
# Opacus' own numbers (compute_rdp is ``rdp * steps``, so ``steps=1`` scaled by
# the step count is bit-for-bit what it returns for those steps); it is bounded
# (each entry is one float per order), and nothing in it is read from outside.
_RDP_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=_RDP_CACHE_SIZE)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP of one step of the sampled Gaussian mechanism, at every order."""
    rdp = _opacus_rdp().compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
    )
    return tuple(float(x) for x in rdp)


def _rdp(events: Iterable[GaussianEvent]) -> list[float]:
    # RDP composes additively and Opacus' compute_rdp is linear in steps, so
    # events with the same (σ, q) merge into one curve: a ledger query costs one
    # curve per distinct mechanism, not one per round (a node checks its
    # lifetime ledger on every message; it grew with every round before).
    steps: dict[tuple[float, float], int] = {}
    for ev in events:
        key = (ev.noise_multiplier, ev.sample_rate)
        steps[key] = steps.get(key, 0) + ev.steps
    total = [0.0] * len(RDP_ORDERS)
    for (sigma, q), n_steps in steps.items():
        total = [a + b * n_steps for a, b in zip(total, _rdp_per_step(sigma, q), strict=True)]
    return total


def epsilon(events: Sequence[GaussianEvent | None], delta: float) -> float:
    """ε at ``delta`` of the composition of ``events`` (0 for none, ∞ if any is None)."""
    if not events:
        return 0.0
    if any(ev is None for ev in events):
        return math.inf
    eps, _ = _opacus_rdp().get_privacy_spent(
        orders=RDP_ORDERS, rdp=_rdp(ev for ev in events if ev is not None), delta=delta
    )
    return float(eps)


def non_private_charge(
    run_id: str, round_: int, sample_rate: float, steps: int, delta: float
) -> PrivacyCharge:
    """The ledger row of a release made without DP (baselines only)."""
    return PrivacyCharge(
        run_id=run_id,
        round=round_,
        mechanism=MECHANISM_NON_PRIVATE,
        noise_multiplier=0.0,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=0.0,
        delta=delta,
        accountant=ACCOUNTANT_NAME,
        accountant_version=accountant_version(),
        epsilon_after=math.inf,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    planned: Sequence[GaussianEvent],
    *,
    prior: Sequence[GaussianEvent | None] = (),
    tolerance: float = 0.005,
) -> float:
    """Smallest sigma such that ``prior`` plus ``planned`` (with sigma) stays ≤ ``target_epsilon``.

    ``planned`` gives sample rates and step counts; its noise multipliers are
    replaced by the sigma searched for. Bisection on sigma: ε is decreasing in sigma.
    """

    def eps_at(sigma: float) -> float:
        # _rdp merges the planned rounds that share a rate into one call.
        events = [*prior, *(GaussianEvent(sigma, p.sample_rate, p.steps) for p in planned)]
        return epsilon(events, delta)

    fixed = epsilon(prior, delta)
    if fixed >= target_epsilon:
        raise ConfigError(
            f"the fixed releases alone already cost ε={fixed:.3f} ≥ target ε={target_epsilon}"
        )
    low, high = 0.05, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError(f"target ε={target_epsilon} is unreachable with this plan")
    while high - low > tolerance * low:
        mid = (low + high) / 2
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
