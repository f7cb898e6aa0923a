"""One Pix2Pix training iteration (Isola et al. 2017) as the ``iteration_update`` of MONAI's
:class:`~monai.engines.SupervisedTrainer`.

Why not :class:`monai.engines.GanTrainer`: its generator input comes from ``g_prepare_batch(batch_size,
latent_shape, ...)``, which sees the batch size only (a latent code, not the batch), and its generator
loss is ``g_loss_function(g_output)``, which never sees the target. Pix2Pix's generator is conditioned on
the input image and its loss has an L1 term against the target, so neither can be expressed. The
stock ``SupervisedTrainer`` keeps everything else (data loader, handlers, checkpointing, validation,
``StopOnNonFiniteLoss``); this callable replaces only its ``_iteration``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys

__all__ = ["Pix2PixIteration"]


class Pix2PixIteration:
    """The conditional-GAN step: discriminator first, then generator, each with its own optimiser.

    With ``x`` the inputs (B, C_in, H, W), ``y`` the target (B, C_out, H, W), ``G`` the trainer's
    ``network`` and ``D`` the discriminator on the channel-concatenated pair:

    1. ``fake = G(x)`` (through the trainer's ``inferer``);
    2. discriminator: ``d_loss = (adv(D(x, y), real) + adv(D(x, fake.detach()), fake)) / 2``, a step of
       ``d_optimizer`` (the paper halves D's objective to slow it relative to G); the real and the
       generated pair go through D in one batch (one forward per backward, as DDP requires), so its
       batch-norm statistics are those of both;
    3. generator: ``loss = adv(D(x, fake), real) + l1_weight * mean|fake - y|``, a step of the trainer's
       ``optimizer`` only (the gradients this pass leaves on D are zeroed before D's next step).

    ``adv`` is :class:`monai.losses.PatchAdversarialLoss` (``criterion="bce"``: the paper's log loss)
    on D's last output (the patch logits). ``IterationEvents.LOSS_COMPLETED`` fires before each
    backward pass (with ``output["loss"]`` the loss about to be back-propagated: D's, then G's), so
    :class:`common.handlers.StopOnNonFiniteLoss` stops before a non-finite loss changes any weight.
    The output holds ``image``, ``label``, ``pred``, ``loss`` (G's objective) and ``d_loss``,
    ``g_adv``, ``g_l1`` (scalar tensors). Mixed precision is not used (fp32 steps; the trainer's ``amp`` is ignored).

    Args:
        discriminator: the PatchGAN (a module, possibly DDP-wrapped), on the trainer's device.
        d_optimizer: the discriminator's optimiser.
        l1_weight: lambda of the L1 term (100 in the paper).
        criterion: the adversarial criterion of :class:`PatchAdversarialLoss` (``bce``, ``least_squares``, ``hinge``).
    """

    def __init__(
        self, discriminator: torch.nn.Module, d_optimizer: torch.optim.Optimizer, l1_weight: float = 100.0,
        criterion: str = "bce",
    ) -> None:  # fmt: skip
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.l1_weight = float(l1_weight)
        if self.l1_weight < 0:
            raise ValueError(f"--l1_weight: expected a number >= 0, got {l1_weight}")
        self.adversarial = PatchAdversarialLoss(criterion=criterion)

    def logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The discriminator's patch logits of the pair ``(x, y)``: (B, 1, h, w)."""
        out = self.discriminator(torch.cat([x, y], dim=1))
        return out[-1] if isinstance(out, (list, tuple)) else out

    def adversarial_loss(self, logits: torch.Tensor, real: bool, for_discriminator: bool) -> torch.Tensor:
        """:class:`PatchAdversarialLoss` of ``logits``; NaN (with a gradient path) when a logit is not finite,
        where the BCE criterion would raise, so that ``StopOnNonFiniteLoss`` names the iteration and cases."""
        if not bool(torch.isfinite(logits).all()):
            return logits.sum() * float("nan")
        return self.adversarial(logits, target_is_real=real, for_discriminator=for_discriminator)

    def __call__(self, engine: Any, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, y = batch[0], batch[1]
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        y = y.as_tensor() if hasattr(y, "as_tensor") else y
        engine.state.output = output = {Keys.IMAGE: x, Keys.LABEL: y}
        generator, d = engine.network, self.discriminator
        generator.train()
        d.train()

        fake = engine.inferer(x, generator)
        output[Keys.PRED] = fake
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        # discriminator step
        self.d_optimizer.zero_grad(set_to_none=True)
        # real and generated pairs in one forward (one forward per backward, as DDP expects)
        real, generated = self.logits(torch.cat([x, x]), torch.cat([y, fake.detach()])).chunk(2)
        d_loss = 0.5 * (
            self.adversarial_loss(real, True, for_discriminator=True)
            + self.adversarial_loss(generated, False, for_discriminator=True)
        )
        output[Keys.LOSS] = d_loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        d_loss.backward()
        self.d_optimizer.step()

        # generator step (D's gradients of this pass are discarded: the next D step zeroes them first)
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        g_adv = self.adversarial_loss(self.logits(x, fake), True, for_discriminator=False)
        g_l1 = torch.nn.functional.l1_loss(fake, y)
        loss = g_adv + self.l1_weight * g_l1
        output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        output.update(d_loss=d_loss.detach(), g_adv=g_adv.detach(), g_l1=g_l1.detach())
        output[Keys.PRED] = fake.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output  # decollated by the trainer's MODEL_COMPLETED handler (decollate=True)
