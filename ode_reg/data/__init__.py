"""LightningDataModules for long-memory and toy tasks; all data is made locally, none downloaded.

Every module makes its train/val/test tensors in ``setup()`` from its ``seed`` and returns
``(x, y)`` batches. Sequence tasks give float32 ``x`` of shape ``(B, T, input_dim)`` and expose
``input_dim``, ``seq_len`` and ``output_dim`` or ``num_classes`` before ``setup()``, so a model
can be built from the data module:

* :class:`AddingDataModule`: the adding problem (regression, ``output_dim = 1``).
* :class:`CopyingDataModule`: the copying memory problem (per-step classification).
* :class:`DigitsDataModule`: sklearn's 8×8 digits as pixel, permuted or noise-padded sequences.
* :class:`TwoMoonsDataModule`: two moons, non-sequential ``x`` of shape ``(B, 2)``.
"""

from ode_reg.data.adding import AddingDataModule
from ode_reg.data.copying import CopyingDataModule
from ode_reg.data.digits import DigitsDataModule
from ode_reg.data.moons import TwoMoonsDataModule

__all__ = [
    "AddingDataModule",
    "CopyingDataModule",
    "DigitsDataModule",
    "TwoMoonsDataModule",
]
