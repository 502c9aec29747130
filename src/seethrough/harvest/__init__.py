"""Harvest: run one trace body over many prompts and keep what it selects on disk.

``with model.harvest(prompts, to="acts/") as run: run.keep(...)`` (see
:mod:`.run`) and ``seethrough.load("acts/")`` (see :mod:`.store`).
"""

from .run import Harvest
from .store import HarvestStore, HarvestStoreError, Rows, RowsDataset, load

__all__ = ["Harvest", "HarvestStore", "HarvestStoreError", "Rows", "RowsDataset", "load"]
