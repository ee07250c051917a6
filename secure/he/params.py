"""CKKS parameters chosen from a plan's multiplicative depth, and the 128-bit rule.

Security: the HomomorphicEncryption.org standard (Albrecht et al., "Homomorphic
Encryption Standard", 2018, Table 1, classical attacks, ternary secret, error
σ ≈ 3.2) bounds the total coefficient modulus for 128-bit security per ring
degree. SEAL/TenSEAL use exactly those secret and error distributions, so a
parameter set is accepted only when ``sum(coeff_mod_bit_sizes)`` is at most
the table's value for its ``poly_modulus_degree``.

Shape of the modulus chain: ``[60, 40 × depth, 60]`` with scale 2^40. The
first prime (60 bits) leaves 20 bits of head-room above the scale for the
decrypted values (|logit| < 2^19 with ample margin); each 40-bit prime is
consumed by one rescale; the last 60-bit prime is the key-switching "special"
prime and is never a data level. 2^40 gives ~1e-7 relative precision per
operation, three orders of magnitude inside the 1e-3 accuracy contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedvault.errors import ConfigError

# log2(q) maximum for 128-bit classical security (HE standard, Table 1).
HE_STANDARD_128_MAX_LOG_Q: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

SCALE_BITS = 40
OUTER_PRIME_BITS = 60
# Ring degrees we choose from, smallest first. 4096 is left out on purpose:
# it fits depth 1 only with a scale below 2^30, too coarse for the 1e-3 contract.
CANDIDATE_DEGREES = (8192, 16384, 32768)


def max_secure_log_q(poly_modulus_degree: int) -> int:
    """Largest total modulus (bits) that keeps ``poly_modulus_degree`` at 128 bits."""
    try:
        return HE_STANDARD_128_MAX_LOG_Q[poly_modulus_degree]
    except KeyError:
        raise ConfigError(
            f"poly_modulus_degree {poly_modulus_degree} is not a supported power of two "
            f"({', '.join(map(str, HE_STANDARD_128_MAX_LOG_Q))})"
        ) from None


def require_128_bit(poly_modulus_degree: int, total: int) -> None:
    """Refuse parameters the HE standard does not rate at ≥128-bit classical security.

    ``total`` is the bit count of the whole coefficient modulus, special prime included.
    """
    limit = HE_STANDARD_128_MAX_LOG_Q.get(poly_modulus_degree)
    if limit is None or total > limit:
        raise ConfigError(
            f"CKKS parameters N={poly_modulus_degree} with {total} coefficient modulus bits "
            f"are below 128-bit security (HomomorphicEncryption.org standard: at most "
            f"{limit if limit is not None else 'n/a'} bits for this N)"
        )


@dataclass(frozen=True, slots=True)
class CKKSParams:
    """Everything a caller needs to create a matching TenSEAL context."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int = SCALE_BITS

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def global_scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def depth(self) -> int:
        """Rescales available: data primes after the first, special prime excluded."""
        return len(self.coeff_mod_bit_sizes) - 2

    def is_128_bit_secure(self) -> bool:
        limit = HE_STANDARD_128_MAX_LOG_Q.get(self.poly_modulus_degree)
        return limit is not None and self.total_bits <= limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": "CKKS",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale": f"2^{self.scale_bits}",
            "global_scale_bits": self.scale_bits,
            "slots": self.slots,
            "total_coeff_modulus_bits": self.total_bits,
            "security": {
                "bits": 128,
                "standard": "HomomorphicEncryption.org (2018) Table 1, classical, ternary secret",
                "max_coeff_modulus_bits": HE_STANDARD_128_MAX_LOG_Q[self.poly_modulus_degree],
            },
        }


def params_for_depth(depth: int, *, min_slots: int = 0) -> CKKSParams:
    """Smallest ring that holds ``depth`` rescales at 128-bit security.

    ``min_slots`` lets the vector layout ask for room for its packing.
    """
    if depth < 1:
        raise ConfigError(f"multiplicative depth must be at least 1, got {depth}")
    bits = (OUTER_PRIME_BITS, *([SCALE_BITS] * depth), OUTER_PRIME_BITS)
    for degree in CANDIDATE_DEGREES:
        if sum(bits) <= HE_STANDARD_128_MAX_LOG_Q[degree] and degree // 2 >= min_slots:
            return CKKSParams(degree, bits)
    raise ConfigError(
        f"no 128-bit secure CKKS parameters hold depth {depth} with {min_slots} slots "
        f"(largest ring {CANDIDATE_DEGREES[-1]})"
    )
