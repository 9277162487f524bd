"""A trained workdir as one object (Trained): the trained model (engine/trained_model.TrainedModel)
with the specs it was resolved from, its workdir and the reconstructor's step. restore.py builds it
from a workdir; pipeline.py from the run that just trained; export, evaluate, validation and the
Python API take it whole."""

from __future__ import annotations

import dataclasses

from maskad_jax.common.specs import Specs
from maskad_jax.engine.trained_model import TrainedModel


@dataclasses.dataclass(frozen=True)
class Trained(TrainedModel):
    """TrainedModel's parts (extractor, model, params, pools, mpo), and specs (every section the run
    was resolved into), workdir (absolute) and step (the reconstructor's checkpoint step; None where
    the run that trained it did not stop at a checkpoint it knows)."""

    specs: Specs
    workdir: str
    step: int | None

    def shape_note(self, cls: str, width: int, height: int) -> str:
        """A note when an image's aspect ratio lies outside class cls's training images' (the fit's
        record): under crop or resize it reaches the model shaped otherwise; "" when it fits."""
        if self.pools.shape_fits(cls, width, height):
            return ""
        lo, hi = self.pools.aspect_range(cls)
        return (
            f"its shape (width/height {width / height:.3g}) is outside class {cls}'s training images' "
            f"({lo:.3g} to {hi:.3g}): the map and score are less reliable; train on images of this shape"
        )
