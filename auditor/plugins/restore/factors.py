"""Per-channel factor estimates against the reference, and how they are logged.

All of it works on plain tensors. A row factor is the least-squares ``a`` in
``suspect ~ a * reference``; a reader's column factors come from alternating
least squares with the reader's own row factors solved for alongside (its
rows may be scaled too, and not yet restored), so they are known up to one
factor for the whole layer (the gauge), which :func:`combine` fixes from the
producer side where it can.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "ALS_ROUNDS", "channel_shape", "column_factors", "combine", "least_squares_factors", "log_entry",
    "merge_entries", "significant",
]  # fmt: skip


def least_squares_factors(suspect_rows: torch.Tensor, reference_rows: torch.Tensor) -> torch.Tensor:
    """Per row, the factor ``a`` minimising ``|s - a r|`` over the suspect's non-zero entries; NaN where
    either row is zero. A zero says nothing about scale: a pruned weight or a cut-off input is zero
    whatever the channel's factor, and counting it would pull every factor towards 0 (a pruned
    model's rows would look shrunk, and be blown up by their kept fraction)."""
    s = suspect_rows.reshape(suspect_rows.shape[0], -1).to(torch.float64)
    r = reference_rows.reshape(reference_rows.shape[0], -1).to(torch.float64) * (s != 0)
    rr, ss = (r * r).sum(1), (s * s).sum(1)
    a = (s * r).sum(1) / rr.clamp_min(1e-300)
    return torch.where((rr > 1e-24) & (ss > 1e-24), a, torch.full_like(a, float("nan")))


#: Alternating least-squares rounds at most for a reader's column factors (it stops once they settle;
#: widely spread row factors, as after per-channel scaling, take a few dozen).
ALS_ROUNDS = 500


def column_factors(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per input channel ``j`` the factor ``d_j`` in ``s[i, j] ~ a_i * d_j * r[i, j]``, the row factors ``a_i``
    (the reader's own, not yet restored) solved for alongside and normalised to a geometric mean of 1."""
    s = s.to(torch.float64)
    r = r.to(torch.float64) * (s != 0)  # zeros (pruned, cut off) say nothing about scale
    a = torch.ones(s.shape[0], dtype=torch.float64)
    d = torch.ones(s.shape[1], dtype=torch.float64)
    rs, rr = (r * s).sum(2), (r * r).sum(2)  # (rows, channels)
    for _ in range(ALS_ROUNDS):
        previous = d
        d = (a @ rs) / (a**2 @ rr).clamp_min(1e-300)
        a = (rs @ d) / (rr @ d**2).clamp_min(1e-300)
        # Up to the gauge (a * k, d / k), which the next step fixes: compare directions.
        if float((d / d.norm() - previous / previous.norm()).abs().max()) < 1e-12:
            break
    ok = a.abs() > 1e-12
    gauge = a[ok].abs().log().mean().exp() if ok.any() else torch.tensor(1.0, dtype=torch.float64)
    d = d * gauge
    valid = (rr.sum(0) > 1e-24) & ((s * s).sum(2).sum(0) > 1e-24) & torch.isfinite(d)
    return torch.where(valid, d, torch.full_like(d, float("nan")))


def combine(p: torch.Tensor | None, d: torch.Tensor | None, width: int) -> torch.Tensor:
    """The output factor ``c`` from the producer side (``p ~ c``) and the readers (``d ~ k / c``, with ``k``
    the readers' unknown overall gauge, fitted as the median of ``p * d``)."""
    nan = torch.full((width,), float("nan"), dtype=torch.float64)
    p = nan if p is None else p.to(torch.float64)
    d = nan if d is None else d.to(torch.float64)
    both = torch.isfinite(p) & torch.isfinite(d) & (p != 0) & (d != 0)
    log_k = (p[both].abs().log() + d[both].abs().log()).median() if both.any() else torch.tensor(0.0)
    from_readers = log_k.exp() / d
    c = torch.where(both, p.sign() * ((p.abs().log() + from_readers.abs().log()) / 2).exp(), p)
    return torch.where(torch.isfinite(c), c, from_readers).to(torch.float32)


def significant(f: torch.Tensor, deadband: float) -> torch.Tensor:
    """The channels to rescale: none when every factor is within the dead band, else every channel
    with a usable factor (so that a factor the estimates share is not left on a few channels)."""
    usable = torch.isfinite(f) & (f != 0)
    edited = usable & ((f < 0) | (f.abs().log().abs() > deadband))
    return usable & (f != 1) if edited.any() else edited


def channel_shape(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.ndim - 1)


def log_entry(name: str, stage: str, f: torch.Tensor, apply: torch.Tensor) -> dict[str, Any]:
    changed = f[apply]
    return {
        "name": name, "stage": stage, "scaled": int(apply.sum()), "negated": int((changed < 0).sum()),
        "scale": {"min": round(float(changed.abs().min()), 6), "max": round(float(changed.abs().max()), 6)},
        "factors": {int(i): round(float(f[i]), 6) for i in torch.nonzero(apply).flatten()},
    }  # fmt: skip


def merge_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per layer and stage, each channel's factors over the passes multiplied."""
    merged: dict[tuple[str, str], dict[int, float]] = {}
    for e in entries:
        factors = merged.setdefault((e["name"], e["stage"]), {})
        for ch, f in e["factors"].items():
            factors[ch] = factors.get(ch, 1.0) * f
    out = []
    for (name, stage), factors in merged.items():
        f = torch.tensor([factors[k] for k in sorted(factors)])
        entry = log_entry(name, stage, f, torch.ones(len(f), dtype=torch.bool))
        entry["factors"] = {k: round(factors[k], 6) for k in sorted(factors)}
        out.append(entry)
    return out
