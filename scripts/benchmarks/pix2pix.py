"""Pix2Pix (the papers' conditional-GAN baseline), its default task (prostate DCE): per-volume
(160x160x16) inference (one forward pass per slice, all slices batched), peak memory, and training
iterations per second of the full GAN step (discriminator step + generator step), for the small and
paper-sized networks (untrained: timing only). Network, inferer, optimisers and the GAN step are the
bundle's, parsed from its configs (``common.bundle_objects``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

SHAPE = (160, 160, 16)


def measure_inference(preset: str, device_name: str, shape: tuple[int, int, int] = SHAPE) -> dict:
    """Seconds per volume of ``shape`` (``"vol_s"``) and the generator's parameters (``"params_m"``)."""
    from scripts.benchmarks.common import inference_parts, n_params, timed, warmup_runs, with_peak_memory

    device = torch.device(device_name)
    net, inferer, keys = inference_parts("pix2pix", preset, device_name, 1, "input_keys")
    net.eval()
    cond = torch.randn(1, len(keys), *shape, device=device)
    out = {"vol_s": timed(lambda: inferer(cond, net), warmup=warmup_runs(device), device=device)}
    return with_peak_memory({**out, "params_m": n_params(net) / 1e6}, device)


def measure_training(
    preset: str, device_name: str, batch: int = 8, iters: int = 3, shape: tuple[int, int] = SHAPE[:2]
) -> dict:
    """GAN steps per second (``"ips"``; on CUDA also ``"peak_mib"``) of the bundle's ``train#gan_step``
    (its discriminator, both Adam optimisers, L1 weight 100) on random batches of ``batch`` slices,
    fp32 as the bundle trains; ``"params_m"``: generator + discriminator."""
    from monai.inferers import SimpleInferer

    from scripts.benchmarks.common import bundle_objects, n_params, timed, training_steps, with_peak_memory

    device = torch.device(device_name)
    net, disc, opt, step, in_keys, out_keys = bundle_objects(
        "pix2pix",
        "network",
        "discriminator",
        "train#optimizer",
        "train#gan_step",
        "input_keys",
        "target_keys",
        config="train.json",
        overrides={"network_size": preset, "device": device_name},
    )
    batchdata = {
        "image": torch.randn(batch, len(in_keys), *shape, device=device),
        "label": torch.randn(batch, len(out_keys), *shape, device=device),
    }
    engine = SimpleNamespace(  # what the trainer gives its iteration_update
        prepare_batch=lambda b, dev, non_blocking, **kw: (b["image"], b["label"]),
        state=SimpleNamespace(device=device, output=None),
        non_blocking=False,
        to_kwargs={},
        network=net,
        inferer=SimpleInferer(),
        optimizer=opt,
        optim_set_to_none=False,
        fire_event=lambda event: None,
    )
    n = training_steps(preset, device, iters)
    seconds = timed(lambda: [step(engine, batchdata) for _ in range(n)], warmup=1, device=device)
    return with_peak_memory({"ips": n / seconds, "params_m": (n_params(net) + n_params(disc)) / 1e6}, device)


def _rows(dev: str, preset: str) -> list[dict]:
    from scripts.benchmarks.common import measure_on, row, training_row

    res, mem = measure_on(dev, measure_inference, preset, dev)
    what = f"pix2pix inference, one 160x160x16 volume, one forward pass, {preset} net"
    out = [row(what, f"{res['vol_s']:.2f} s", dev, f"{res['params_m']:.1f}M params, 16 slices batched; {mem}")]
    train = training_row(
        dev,
        preset,
        measure_training,
        lambda train, batch: f"pix2pix training (D + G step), batch {batch} slices 160x160, {preset} net",
        "Adam 2e-4 (0.5, 0.999), PatchGAN BCE + 100 L1, fp32",
        batch=8,
        cpu_batch_note="; the paper net is measured with 2 slices on a CPU",
    )
    return out + [train]


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import per_device

    return per_device(_rows)
