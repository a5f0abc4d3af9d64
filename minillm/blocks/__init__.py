"""The block loop and what runs on it: the sweep shared by exact gradients and reconstruction,
streaming a model that does not fit in memory, torch.distributed reductions, resume checkpoints."""
