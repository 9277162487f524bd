"""The paper's Table-2 rows as sets of scoring switches, shared by the configs' `ablation=<row>`
variant and the learning curves (train.eval_rows).

The paper does not define its rows precisely; our reading: prototype-oriented masks belong to the
multi-branch ("parallel") masking; "M_po" is the final multiplication by the abnormality map;
"reference" adds the reference branch and AssDis. Only scoring switches: a trained workdir can be
evaluated under every row with --mode=eval.
"""

from __future__ import annotations

import dataclasses

from maskad_jax.common.errors import ConfigError

_ON = dict(use_rec=True, use_reference=True, use_assdis=True, use_mpo=True)

# Each row sets all four term switches, so it means the same whatever the config's defaults.
ABLATIONS = {
    "rec_only": dict(
        _ON,
        prototype_ratios=(),
        num_random=1,
        num_block=0,
        zero_mask=False,
        use_reference=False,
        use_assdis=False,
        use_mpo=False,
    ),  # one random mask, Rec alone
    "parallel": dict(_ON, use_reference=False, use_assdis=False, use_mpo=False),  # N masks, Rec
    "parallel_ref": dict(_ON, use_mpo=False),  # + the reference branch and AssDis
    "parallel_mpo": dict(_ON, use_reference=False, use_assdis=False),  # N masks, Rec x M_po
    "no_rec": dict(_ON, use_rec=False),  # AssDis x M_po
    "rec_ref_mpo": dict(_ON, use_assdis=False),  # Rec (in scoring.error_units) x M_po: the CPU configs' default
    "full": dict(_ON),  # (Rec + AssDis) x M_po, the paper's Eq. 2
    "mpo_only": dict(_ON, use_rec=False, use_reference=False, use_assdis=False),  # the nearest-neighbour term alone
    "default": dict(),  # the config's own scoring, unchanged
}


def with_row(sc, row: str):
    """A scoring spec (common/specs.ScoringSpec, frozen) with the row's switches."""
    if row not in ABLATIONS:
        raise ConfigError(f"unknown ablation row {row!r}; known: {', '.join(ABLATIONS)}")
    return dataclasses.replace(sc, **ABLATIONS[row])


def apply_row(scoring, row: str):
    """Set a Table-2 row's switches on a scoring config section (in place); returns it."""
    if row not in ABLATIONS:
        raise ConfigError(f"unknown ablation row {row!r}; known: {', '.join(ABLATIONS)}")
    for k, v in ABLATIONS[row].items():
        setattr(scoring, k, v)
    return scoring
