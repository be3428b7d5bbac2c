"""Training a hybrid PNN's digital readout in software, on outputs already measured.

The readout acts on measured outputs, so every minibatch a method measures (outputs and
labels) is free training data for it: no setting is spent. :class:`ReadoutMemory` keeps the
last ``size`` minibatches and takes Adam steps on their mean cross-entropy. The outputs of
older minibatches were measured at earlier device settings; keeping only a few keeps that
lag short while giving the readout more rows than one minibatch, which it would overfit.
The digital input layer changes the device's inputs, so it cannot be trained this way.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from .pnn import PNN


class ReadoutMemory:
    """Recent measured minibatches ``(y (B, out_dim), labels (B,))`` and an Adam optimiser
    on ``pnn.readout``. Build it with :func:`readout_memory`."""

    def __init__(self, pnn: PNN, size: int, lr: float):
        self.pnn, self.size = pnn, int(size)
        self.ys: deque = deque(maxlen=self.size)
        self.labels: deque = deque(maxlen=self.size)
        self.opt = torch.optim.Adam(list(pnn.readout.parameters()), lr=lr)
        self.steps = 0

    def add(self, y: np.ndarray, labels) -> None:
        """Remember one measured minibatch (copied: callers reuse their arrays)."""
        self.ys.append(torch.as_tensor(np.array(y, float)))
        self.labels.append(torch.as_tensor(np.asarray(labels)))

    def train(self, steps: int) -> float:
        """``steps`` Adam steps on the remembered rows; returns the loss before them."""
        y, lab = torch.cat(list(self.ys)), torch.cat(list(self.labels))
        first = float("nan")
        for i in range(steps):
            self.opt.zero_grad()
            loss = F.cross_entropy(self.pnn(y), lab)
            loss.backward()
            self.opt.step()
            first = float(loss.detach()) if i == 0 else first
        self.steps += steps
        return first


def readout_memory(pnn: PNN, size: int, lr: float) -> ReadoutMemory | None:
    """A :class:`ReadoutMemory` for a hybrid PNN; None for a device-only one (no readout to
    train) or when ``size`` or ``lr`` is 0 (turned off)."""
    if not pnn.trainable or size <= 0 or lr <= 0:
        return None
    return ReadoutMemory(pnn, size, lr)
