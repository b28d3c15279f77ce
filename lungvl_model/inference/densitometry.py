"""The report's emphysema sentence, written from the measured LAA-950, never generated.

The decoder writes nodule sentences from finding slots; nothing in a slot says whether the lungs are
emphysematous, and the reference reports of every cohort do say it ("Mild centrilobular emphysema.", "No
emphysema."). The pipeline measures it: the share of lung voxels below -950 HU
(:func:`~lungvl_model.inference.anatomy.emphysema_index`), read against the threshold the rule engine and the fact
check use (:data:`~lungvl_model.inference.anatomy.EMPHYSEMA_LAA`). The sentence states that measurement and
nothing more: no subtype (centrilobular, paraseptal) and no grade, which the index does not measure.

On 48 synthetic validation and test studies the index above the threshold agreed with the reference report's
emphysema in 44 (two non-emphysematous lungs at 7.6 %; two emphysematous ones, one on 5 mm slices, at 2.6 %).
Densitometry depends on the reconstruction kernel and dose (sharp kernels and noise raise LAA-950); the sentence
names the measure so that a reader can weigh it.

Pure functions, no torch.
"""

from __future__ import annotations

import math

from lungvl_model.inference.anatomy import EMPHYSEMA_LAA

__all__ = ["emphysema_sentence"]


def emphysema_sentence(laa950: float | None) -> str | None:
    """The FINDINGS sentence about emphysema, from the lungs' LAA-950.

    Args:
        laa950: fraction of lung voxels below -950 HU in ``[0, 1]``; None or NaN when the lungs were not found.

    Returns:
        ``"Emphysema by densitometry: 7.6 % of the lung volume below -950 HU (LAA-950)."`` above
        :data:`EMPHYSEMA_LAA`, ``"No emphysema by densitometry: ..."`` at or below it, None without a measurement.

    Raises:
        ValueError: a fraction outside ``[0, 1]``.
    """
    if laa950 is None or math.isnan(laa950):
        return None
    if not 0.0 <= laa950 <= 1.0:
        raise ValueError(f"emphysema_sentence: laa950 must be a fraction in [0, 1], got {laa950!r}")
    head = "Emphysema" if laa950 > EMPHYSEMA_LAA else "No emphysema"
    return f"{head} by densitometry: {100.0 * laa950:.1f} % of the lung volume below -950 HU (LAA-950)."
