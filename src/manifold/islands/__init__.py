"""islands: groups of devices that train apart and meet through an outer step.

`manifold.islands.diloco` holds the math of DiLoCo (arXiv 2311.08105) and Streaming
DiLoCo (arXiv 2501.18512) as pure functions: the outer gradient, the outer optimizer,
quantised outer gradients with error feedback, the fragment schedule, and byte counts.
"""
