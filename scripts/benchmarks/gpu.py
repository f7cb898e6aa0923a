"""The prepared GPU check (``scripts/gpu_check.sh``, ``make gpu-check``): on one CUDA GPU, for every
bundle, with the paper-sized network and ``precision auto`` (:func:`common.device.resolve_precision`):

1. a few training iterations of the bundle's own ``train#prepare_batch`` + ``train#inferer`` +
   ``train#loss`` + ``train#optimizer`` (``configs/train.json``) on random batches (iterU-Net: its
   benchmark section's chain training), forward under autocast, a ``GradScaler`` only for float16;
2. one volume synthesised at the paper's number of steps (the bundle's ``inference.json`` default)
   with the bundle's volume inferer; where one step times the steps would pass ``max_volume_s``,
   the volume time is one step's time x steps (and the row says so);
3. a 1-process DDP step: ``torchrun --nproc_per_node 1`` of ``train.json`` + ``multi_gpu_train.json``
   (nccl on CUDA) for 2 iterations on a few small phantoms;

and writes one table of CUDA rows (time per training step, per sampling step and per volume, peak
GPU memory, the device name) between ``<!-- gpu-check:start -->`` and ``<!-- gpu-check:end -->`` of
``benchmark.md`` (replaced on a rerun; the rest of the file is kept).

    python scripts/benchmarks/gpu.py [--out benchmark.md] [--only resdce,d3m] [--device cpu --tiny]

Without CUDA (and without ``--device cpu``) it prints one line and exits 0. ``--device cpu --tiny``
runs the same path with the small network, 2 sampling steps, tiny volumes and no DDP step (the
tests' check of the row writing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, this folder (holding ``common.py``) would shadow ``common``
    sys.exit("run it as scripts/gpu_check.sh or, from the repository root, python -m scripts.benchmarks.gpu")

from common.device import precision_name, resolve_precision  # noqa: E402
from scripts.benchmarks.common import bundle_parser, timed, training_rate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

BUNDLES = ("resdce", "dcediff", "ressrdiff", "d3m", "iterunet")
START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
#: per bundle: the synthesised volume (H, W, D), the training batch and in-plane size, the phantoms
#: of the DDP step (kind, layout) and its extra options
SPEC = {
    "resdce": dict(volume=(160, 160, 16), batch=8, size=160, phantoms=("prostate", "prepared"), ddp=[]),
    "dcediff": dict(
        volume=(160, 160, 16),
        batch=8,
        size=160,
        phantoms=("prostate", "prepared"),
        ddp=["--patch_size", "[64,64]", "--batch_size", "4"],
    ),
    "ressrdiff": dict(
        volume=(320, 320, 20), batch=8, size=192, phantoms=("prostate", "nifti"), ddp=["--batch_size", "4"]
    ),
    "d3m": dict(
        volume=(240, 240, 155),
        batch=16,
        size=256,
        phantoms=("brain", ""),
        ddp=["--spatial_size", "[64,64]", "--batch_size", "4", "--slices_per_volume", "2"],
    ),
    "iterunet": dict(volume=(128, 128, 32), batch=None, size=None, phantoms=("breast", ""), ddp=[]),
}
TINY = dict(volume=(32, 32, 2), batch=2, size=32)
#: tiny volumes of the bundles whose inferer needs more than 2 slices (D3M's brain: an ellipsoid over
#: the slices; iterU-Net's 3D windows)
TINY_VOLUME = {"d3m": (32, 32, 8), "iterunet": (16, 16, 8)}


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def train_steps(bundle: str, preset: str, device: torch.device, iters: int, batch: int, size: int) -> dict:
    """Seconds per training step (after one warm-up step) of the bundle's training objects on random batches,
    under the autocast the bundle's trainer uses in ``precision auto`` (:func:`common.device.training_autocast`)."""
    if bundle == "iterunet":
        from scripts.benchmarks.iterunet import measure_training

        r = measure_training(preset, str(device), iters=iters)
        return {"step_s": 1.0 / r["ips"], "how": "its benchmark section's chain (AMP as its trainer)"}
    p = bundle_parser(bundle, "train.json", {"network_size": preset, "device": str(device)})
    net = p.get_parsed_content("network")
    prep, inferer, loss_fn, opt = (
        p.get_parsed_content(k) for k in ("train#prepare_batch", "train#inferer", "train#loss", "train#optimizer")
    )
    net.train()
    c_in = int(p.get_parsed_content("network_def#in_channels"))
    c_out = {"d3m": 2}.get(bundle) or int(p.get_parsed_content("network_def#out_channels"))
    image = torch.rand(batch, c_in - c_out, size, size, device=device)
    label = torch.rand(batch, c_out, size, size, device=device) * 2 - 1

    def loss() -> torch.Tensor:
        inputs, targets, args, kwargs = prep({"image": image, "label": label}, device, False)
        return loss_fn(inferer(inputs, net, *args, **kwargs).float(), targets)

    # the bundles' training step (autocast as the trainer in `auto`, gradient scaler, one warm-up step)
    step_s = 1.0 / training_rate(loss, opt, device, iters, p.get_parsed_content("auto_precisions"))["ips"]
    return {"step_s": step_s, "how": f"batch {batch} x {size}x{size}"}


def synthesise(
    bundle: str, preset: str, device: torch.device, volume: tuple, steps: int | None, max_volume_s: float
) -> dict:
    """Seconds per sampling step and per volume of the bundle's inferer (``precision auto``)."""
    over = {"network_size": preset, "device": str(device), "precision": "auto", "progress": False}
    if steps is not None:  # a few steps (the tiny check): DCE-diff's DDPM runs all 1000, DDIM respaces
        over["num_inference_steps"] = steps
        if bundle == "dcediff":
            over["sampler"] = "ddim"
    p = bundle_parser(bundle, ("train.json", "inference.json"), over)
    net, inferer = p.get_parsed_content("network").eval(), p.get_parsed_content("inferer")
    if hasattr(inferer, "progress"):
        inferer.progress = False
    g = torch.Generator().manual_seed(0)
    if bundle == "iterunet":
        from scripts.benchmarks.iterunet import TIMES

        series = torch.rand(1, len(TIMES), *volume, generator=g).to(device)
        times = torch.tensor([TIMES], device=device)
        run = lambda: inferer(series, net, times)  # noqa: E731
        n_steps = len(TIMES) - 1 - int(p.get_parsed_content("start_phase"))
    else:
        n_cond = {"d3m": 3}.get(bundle) or (
            int(p.get_parsed_content("network_def#in_channels")) - int(inferer.out_channels)
        )
        cond = torch.rand(1, n_cond, *volume, generator=g)
        if bundle == "d3m":  # a brain-like support: a centred ellipsoid (skull-stripped zero outside)
            grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in volume], indexing="ij")
            cond = cond * (sum((x / r) ** 2 for x, r in zip(grids, (0.7, 0.8, 0.6))) <= 1)
        cond = cond.to(device)
        n_steps = int(p.get_parsed_content("num_inference_steps"))
        run = lambda: inferer(cond, net)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scaled = ""
    if bundle != "iterunet":
        inferer.num_inference_steps = 1  # one step first (after a warm-up run): the cost of the whole chain
        one = timed(run, warmup=1, device=device)
        inferer.num_inference_steps = n_steps
        if one * n_steps > max_volume_s:
            scaled = f"1 step x {n_steps}, not run in full"
            vol = one * n_steps
        else:
            vol = timed(run, device=device)
    else:
        vol = timed(run, warmup=1, device=device)
    used = getattr(inferer, "precision_used", precision_name(*resolve_precision("auto", device)))
    return {"volume_s": vol, "step_s": vol / n_steps, "steps": n_steps, "scaled": scaled, "precision": used}


def ddp_step(bundle: str, preset: str, data_root: Path, out: Path) -> dict:
    """``torchrun --nproc_per_node 1`` of train.json + multi_gpu_train.json for 2 iterations; seconds and status."""
    from common.phantoms import write_phantoms

    kind, layout = SPEC[bundle]["phantoms"]
    if not (data_root / kind).is_dir():
        kw = {"dicom": False} if kind in ("prostate", "brain") else {}
        write_phantoms(data_root, kinds=(kind,), small=True, progress=False, **{f"n_{kind}": 4}, **kw)
    configs = ROOT / "bundles" / bundle / "configs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29517",
        "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']",
        "--output_dir", str(out / bundle), "--num_iterations", "2", "--epoch_length", "1",
        "--dataset_dir", str(data_root / kind / layout if layout else data_root / kind),
        "--network_size", preset, "--num_workers", "0", "--val_interval", "0", *SPEC[bundle]["ddp"],
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"ok": False, "wall_s": wall, "why": tail[0][:160]}
    return {"ok": True, "wall_s": wall, "why": ""}


def check_bundle(bundle: str, device: torch.device, tiny: bool, max_volume_s: float, ddp_dir: Path | None) -> dict:
    spec = {**SPEC[bundle], **(TINY if tiny else {})}
    preset = "small" if tiny else "paper"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = train_steps(bundle, preset, device, 1 if tiny else 5, spec["batch"], spec["size"])
    train_peak = _peak_mib(device)
    volume = TINY_VOLUME.get(bundle, spec["volume"]) if tiny else spec["volume"]
    synth = synthesise(bundle, preset, device, volume, 2 if tiny and bundle != "iterunet" else None, max_volume_s)
    infer_peak = _peak_mib(device)
    ddp = ddp_step(bundle, preset, ddp_dir / "phantoms", ddp_dir / "runs") if ddp_dir is not None else None
    return {"train": train, "train_peak": train_peak, "synth": synth, "infer_peak": infer_peak, "ddp": ddp}


def rows_markdown(results: dict, device_name: str, preset: str) -> str:
    """The markdown table of :func:`check_bundle` results (one row per bundle)."""
    head = (
        "| bundle | net | precision | train s/step | train peak MiB | volume | steps | s/step | s/volume "
        "| infer peak MiB | DDP 1-process | device |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for b, r in results.items():
        if "error" in r:
            lines.append(f"| {b} | {preset} | | failed: {r['error']} | | | | | | | | {device_name} |")
            continue
        s, d = r["synth"], r["ddp"]
        ddp = "not run" if d is None else (f"ok, {d['wall_s']:.0f} s" if d["ok"] else f"failed: {d['why']}")
        vol = "x".join(str(v) for v in r["volume"])
        lines.append(
            f"| {b} | {preset} | {s['precision']} | {r['train']['step_s']:.3f} | {r['train_peak']:.0f} | {vol} "
            f"| {s['steps']} | {s['step_s']:.3f} | {s['volume_s']:.1f}{' (' + s['scaled'] + ')' if s['scaled'] else ''} "
            f"| {r['infer_peak']:.0f} | {ddp} | {device_name} |"
        )
    return head + "\n".join(lines) + "\n"


def write_section(path: Path, table: str, note: str) -> None:
    """Put ``table`` and ``note`` between the gpu-check markers of ``path`` (appended when absent), atomically."""
    from common.io import atomic_path

    text = path.read_text() if path.is_file() else ""
    block = f"{START}\n### CUDA check (scripts/gpu_check.sh)\n\n{table}\n{note}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def main(
    out: str = "benchmark.md",
    only: str | tuple = ",".join(BUNDLES),
    device: str = "cuda",
    tiny: bool = False,
    ddp: bool | None = None,
    max_volume_s: float = 40.0,
) -> int:
    """Run the check (see the module docstring); returns the exit status."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to do")
        return 0
    dev = torch.device(device)
    bundles = [b.strip() for b in (only.split(",") if isinstance(only, str) else only) if b.strip()]
    unknown = [b for b in bundles if b not in SPEC]
    if unknown:
        print(f"--only: unknown bundle(s) {unknown}; choose from {', '.join(BUNDLES)}")
        return 2
    ddp = (dev.type == "cuda") if ddp is None else bool(ddp)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    preset = "small" if tiny else "paper"
    results = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for b in bundles:
            t0 = time.perf_counter()
            try:
                r = check_bundle(b, dev, tiny, max_volume_s, Path(tmp) if ddp else None)
                r["volume"] = TINY_VOLUME.get(b, TINY["volume"]) if tiny else SPEC[b]["volume"]
            except Exception as e:  # one bundle's failure is a row, not the end of the check
                why = " ".join(f"{type(e).__name__}: {e}".split()).replace("|", "/")
                r = {"error": why[:200]}
            results[b] = r
            print(f"gpu_check: {b} done in {time.perf_counter() - t0:.0f} s", flush=True)
    note = (
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {name}, torch {torch.__version__}, "
        f"{'tiny settings (small net, 2 steps)' if tiny else 'paper-sized networks, the papers’ numbers of steps'}, "
        f"precision auto; whole check {time.perf_counter() - t_all:.0f} s. Peak memory: torch.cuda.max_memory_allocated."
    )
    write_section(Path(out), rows_markdown(results, name, preset), note)
    print(f"gpu_check: rows written to {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    import fire

    def cli(**kwargs) -> None:
        """fire's entry: exit with :func:`main`'s status (and print nothing more)."""
        sys.exit(main(**kwargs))

    fire.Fire(cli)
