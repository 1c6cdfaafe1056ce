"""rl: reinforcement learning from verifiable rewards.

`manifold.rl.tasks` holds prompt sources with a programmatic verifier each (integer
arithmetic, sorting and reversing short lists), deterministic from a seed, with held-out
splits and a warm-up SFT corpus writer. `manifold.rl.grpo` holds the GRPO objective as pure
functions: group-normalised advantages and the clipped, importance-weighted policy loss
with a k3 KL term to a frozen reference.
"""
