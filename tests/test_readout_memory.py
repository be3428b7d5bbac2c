"""Training a hybrid PNN's readout on measured outputs (blackbox_sat.training.readout_memory):
it lowers the loss of outputs the identity readout misreads, touches nothing else, keeps
only the last minibatches, and is off for a device-only PNN."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import describe
from blackbox_sat.sim.mzi import mzi
from blackbox_sat.training.pnn import PNN
from blackbox_sat.training.readout_memory import readout_memory

torch.set_num_threads(1)


def _pnn(mode: str) -> PNN:
    data = load_task("iris")
    return PNN.build(data.x_train, data.n_classes, describe(mzi(seed=0, n_modes=4)), mode)


def _shuffled_outputs(rng, n=64):
    """Outputs ``(n, 4)`` whose class sits on output ``perm[label]``: the identity readout
    (class c reads output c) gets them wrong, a trained one can get them right."""
    labels = rng.integers(0, 3, n)
    perm = np.array([2, 3, 0])
    y = rng.uniform(0, 0.05, (n, 4))
    y[np.arange(n), perm[labels]] += 0.5
    return y, labels


def test_readout_training_lowers_the_loss_and_touches_only_the_readout():
    pnn = _pnn("hybrid")
    pnn.gain.fill_(10.0)
    rng = np.random.default_rng(0)
    before = {k: v.clone() for k, v in pnn.state_dict().items()}
    memory = readout_memory(pnn, size=3, lr=0.05)
    assert memory is not None
    for _ in range(5):  # five minibatches seen, three remembered
        memory.add(*_shuffled_outputs(rng))
        memory.train(20)
    assert len(memory.ys) == 3 and memory.steps == 100
    y, labels = _shuffled_outputs(rng)
    with torch.no_grad():
        loss = float(F.cross_entropy(pnn(torch.as_tensor(y)), torch.as_tensor(labels)))
        pnn.load_state_dict(before)
        loss0 = float(F.cross_entropy(pnn(torch.as_tensor(y)), torch.as_tensor(labels)))
    assert loss < 0.5 * loss0, (loss, loss0)


def test_input_layer_and_buffers_are_left_alone():
    pnn = _pnn("hybrid")
    before = {k: v.clone() for k, v in pnn.state_dict().items()}
    memory = readout_memory(pnn, size=2, lr=0.05)
    assert memory is not None
    memory.add(*_shuffled_outputs(np.random.default_rng(1)))
    memory.train(5)
    after = pnn.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"readout.weight", "readout.bias"}


def test_off_for_a_device_only_pnn_or_a_zero_rate():
    assert readout_memory(_pnn("device"), size=8, lr=0.03) is None
    assert readout_memory(_pnn("hybrid"), size=8, lr=0.0) is None
    assert readout_memory(_pnn("hybrid"), size=0, lr=0.03) is None
