"""Whole networks, one file per system."""

from mnnn.models.amn import AMNNetwork, AMNState
from mnnn.models.amrc import AMRCNetwork
from mnnn.models.baselines import RNNNetwork
from mnnn.models.pmrc import PMRCNetwork, PMRCNetworkState

__all__ = ["AMNNetwork", "AMNState", "AMRCNetwork", "PMRCNetwork", "PMRCNetworkState", "RNNNetwork"]
