"""Projection and emulation of multi-node clusters.

* :mod:`smile.sim.cost_model`: alpha-beta model of flat vs hierarchical All2All and of one MoE
  layer step, fitted to measurements and projected to large clusters.
* :mod:`smile.sim.cluster`: an emulated cluster on one Linux machine (network namespaces with
  shaped uplinks) that runs any torchrun job across its nodes.
"""

from smile.sim.cost_model import (
    PRESETS,
    ClusterSpec,
    FitResult,
    Measurement,
    MoEWorkload,
    all2all_time,
    fit_all2all,
    layer_step,
    projection,
)

__all__ = [
    "PRESETS",
    "ClusterSpec",
    "FitResult",
    "Measurement",
    "MoEWorkload",
    "all2all_time",
    "fit_all2all",
    "layer_step",
    "projection",
]
