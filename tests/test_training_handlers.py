"""Gradient clipping and EMA weights (common.handlers.training) inside MONAI's SupervisedTrainer."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from common.handlers import EMAWeights, GradientClipping


def _trainer(net, handlers, lr=0.1, n=3):
    torch.manual_seed(0)
    data = [{"image": torch.randn(4, 2), "label": torch.randn(4, 1) * 50} for _ in range(n)]
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=torch.nn.MSELoss(),
        train_handlers=handlers,
    )


def test_gradient_norm_is_clipped_to_the_bound_and_untouched_below_it():
    torch.manual_seed(1)
    net = torch.nn.Linear(2, 1)
    seen = []

    def record(engine):
        g = torch.cat([p.grad.ravel() for p in engine.network.parameters()])
        seen.append(float(g.norm()))

    clip = GradientClipping(max_norm=1.0)
    trainer = _trainer(net, [clip])
    from monai.engines.utils import IterationEvents

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)  # after the clipping handler
    trainer.run()
    assert clip.last_norm > 1.0  # targets of scale 50: the raw gradient is far above 1
    assert all(n == pytest.approx(1.0, rel=1e-5) for n in seen)
    # below the bound: unchanged
    net2 = torch.nn.Linear(2, 1)
    clip2 = GradientClipping(max_norm=1e9)
    seen.clear()
    t2 = _trainer(net2, [clip2])
    t2.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)
    t2.run()
    assert seen[-1] == pytest.approx(clip2.last_norm, rel=1e-6)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        GradientClipping(-1)
    assert GradientClipping(0).max_norm == 0.0


def test_ema_equals_the_hand_computed_recursion():
    torch.manual_seed(2)
    net = torch.nn.Linear(2, 1)
    ema = EMAWeights(net, decay=0.9)
    weights = []
    trainer = _trainer(net, [ema], n=4)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(net.weight.detach().clone()))
    trainer.run()
    expected = weights[0]  # the first update copies the weights
    for w in weights[1:]:
        expected = 0.9 * expected + 0.1 * w
    torch.testing.assert_close(ema.averaged.weight, expected)
    assert not torch.allclose(ema.averaged.weight, net.weight)
    # resumable: the state restores the average and the count
    other = EMAWeights(torch.nn.Linear(2, 1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.averaged.weight, expected)
    assert int(other.model.n_averaged) == 4
    # decay 0: the average is the current weights
    plain = EMAWeights(net, decay=0.0)
    plain.update()
    torch.testing.assert_close(plain.averaged.weight, net.weight)
    with pytest.raises(ValueError, match="ema_decay"):
        EMAWeights(net, decay=1.0)
