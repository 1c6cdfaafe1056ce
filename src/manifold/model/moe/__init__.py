"""DeepSeekMoE in one place: routing (router.py), the routed experts' grouped SwiGLU and its
permutations (experts.py), expert parallelism over the mesh (expert_parallel.py), and the
layer that combines them with the shared experts (layer.py)."""

from manifold.model.moe.layer import MoE, MoEAux
from manifold.model.moe.router import RouterBias, route, sequence_balance_loss, updated_bias

__all__ = ["MoE", "MoEAux", "RouterBias", "route", "sequence_balance_loss", "updated_bias"]
