"""One privacy charge for the ledger tests (node ledger, federation store, metrics)."""

from __future__ import annotations

from fedvault.privacy import ACCOUNTANT_NAME, MECHANISM_DP_SGD, PrivacyCharge


def charge(
    run_id: str,
    round_: int,
    *,
    mechanism: str = MECHANISM_DP_SGD,
    sigma: float = 1.1,
    q: float = 0.05,
    steps: int = 20,
    epsilon_after: float = 0.5,
) -> PrivacyCharge:
    """A well-formed charge; only what a test varies needs saying."""
    return PrivacyCharge(
        run_id=run_id,
        round=round_,
        mechanism=mechanism,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant=ACCOUNTANT_NAME,
        accountant_version="opacus-test",
        epsilon_after=epsilon_after,
    )
