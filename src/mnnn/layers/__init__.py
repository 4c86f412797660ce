"""nn.Modules built on ``mnnn.ops``; one file per layer."""

from mnnn.layers.associative import AssociativeManifold
from mnnn.layers.liquid import LiquidLayer
from mnnn.layers.lru import LRU
from mnnn.layers.memory_cells import AMRCCell, AMRCState, PMRCCell, PMRCState
from mnnn.layers.spiking import SpikingLayer, SpikingState

__all__ = [
    "AMRCCell",
    "AMRCState",
    "AssociativeManifold",
    "LRU",
    "LiquidLayer",
    "PMRCCell",
    "PMRCState",
    "SpikingLayer",
    "SpikingState",
]
