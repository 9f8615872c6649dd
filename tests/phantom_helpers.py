"""Shared fixtures of the phantom tests: small studies generated once per test session."""

from __future__ import annotations

from functools import lru_cache

from models.phantom import PhantomSpec, generate_study


@lru_cache(maxsize=None)
def study(seed: int, subtypes: tuple[str, ...] = (), matrix: int = 128, thickness: float = 5.0,
          **kw):
    """A generated study (cached: tests must not modify it)."""
    extra = dict(kw)
    if "lesion_ml" in extra:  # passed as ((subtype, mL), ...) to stay hashable
        extra["lesion_ml"] = dict(extra["lesion_ml"])
    if "extra" in extra:
        extra["extra"] = dict(extra["extra"])
    return generate_study(PhantomSpec(seed=seed, subtypes=subtypes, matrix=matrix,
                                      slice_thickness_mm=thickness, **extra))


def erode(mask, n: int = 1):
    """In-plane erosion (thick slices: do not erode across k)."""
    import numpy as np
    from scipy import ndimage

    st = np.zeros((1, 3, 3), bool)
    st[0] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, st, iterations=n)
