"""smile: bi-level routed Mixture-of-Experts on torch.distributed."""

__version__ = "0.1.0"
