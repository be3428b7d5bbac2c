"""Shared test settings: one torch thread, as every trial runs (a 2-core CI box is easily
oversubscribed, and tiny simulator matmuls then take milliseconds instead of microseconds)."""
import torch

torch.set_num_threads(1)
