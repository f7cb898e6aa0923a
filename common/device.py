"""Device choice shared by every bundle and script: CUDA when available, else CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: CUDA when available and ``device`` is not given (``None``, ``""`` or
    ``"auto"``), else CPU; a given ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``)
    is checked and returned.

    Raises:
        ValueError: naming ``--device`` when the string is not a device, or asks for CUDA on a
        machine without it (or for a GPU index the machine does not have), instead of torch's
        ``AssertionError: Torch not compiled with CUDA enabled`` at the first ``.to(device)``.
    """
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: not a device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use --device cpu, or leave --device out to choose automatically"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


def amp_enabled(device: str | torch.device | None = None) -> bool:
    """Automatic mixed precision is used on CUDA only (CPU autocast to bf16 is slower for these nets)."""
    return get_device(device).type == "cuda"


#: the values of every bundle's ``precision`` setting (``--precision`` on the command line)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the reduced precisions ``auto`` may choose, in its order of preference; a bundle's
#: ``auto_precisions`` narrows them to those whose synthesis was measured within bounds of fp32
#: (issue 27: 0.1 dB PSNR, 0.002 SSIM; DCE-diff's is ``[]``: ``auto`` is fp32 there)
AUTO_PRECISIONS = ("bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN available and the CPU flags ``avx512_bf16``
    or ``amx_bf16`` in ``/proc/cpuinfo``); without them bf16 autocast is emulated and slower."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_has_bf16() -> bool:
    """Whether the current CUDA device supports bfloat16 (``torch.cuda.is_bf16_supported()``)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def check_auto_precisions(auto_precisions: Sequence[str]) -> tuple[str, ...]:
    """``auto_precisions`` as a tuple of lower-case names, each one of :data:`AUTO_PRECISIONS`.

    Raises:
        ValueError: naming ``--auto_precisions`` for another value.
    """
    if isinstance(auto_precisions, str):
        auto_precisions = [auto_precisions]
    names = tuple(str(a).lower() for a in auto_precisions)
    bad = [a for a in names if a not in AUTO_PRECISIONS]
    if bad:
        raise ValueError(
            f"--auto_precisions {list(auto_precisions)!r}: {', '.join(bad)} is not a reduced precision; "
            f"use a list of {', '.join(AUTO_PRECISIONS)} (or [] for fp32)"
        )
    return names


def _device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` without :func:`get_device`'s checks (what a precision would be on a
    CUDA device can be asked on any machine); ``None``: :func:`get_device`'s choice."""
    return torch.device(device) if device is not None else get_device()


def resolve_precision(
    precision: str | None, device: str | torch.device | None, auto_precisions: Sequence[str] = AUTO_PRECISIONS
) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype and memory layout of a network forward on ``device``.

    ``precision`` is one of :data:`PRECISIONS` (``None`` or ``""`` mean ``"auto"``):

    - ``"fp32"``: no autocast (``None``), contiguous layout; :class:`PrecisionNetwork` then runs the
      forward in IEEE float32 (:func:`ieee_fp32`: no TF32 on CUDA);
    - ``"bf16"`` / ``"fp16"``: autocast to that dtype; channels-last on the CPU (where oneDNN gains from it);
    - ``"auto"``: among ``auto_precisions`` (the bundle's setting; default both): on CUDA autocast to
      bfloat16 where the GPU supports it, else float16 (training then needs a ``GradScaler``, see
      :func:`needs_grad_scaler`), contiguous; on a CPU with native bfloat16 (:func:`cpu_has_native_bf16`)
      bfloat16 autocast and channels-last; float32 elsewhere, and wherever the bundle allows neither.

    Only the network forward runs under the dtype (:class:`PrecisionNetwork` casts its output back to
    float32); the schedulers' arithmetic stays float32 / float64.

    Returns:
        (dtype or ``None`` for float32, channels_last).

    Raises:
        ValueError: naming ``--precision`` (or ``--auto_precisions``) for an unknown value.
    """
    p = "auto" if precision in (None, "") else str(precision).lower()
    if p not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    allowed = check_auto_precisions(auto_precisions)
    dev = _device(device)
    if p == "auto":
        if dev.type == "cuda":
            if "bf16" in allowed and cuda_has_bf16():
                return torch.bfloat16, False
            return (torch.float16 if "fp16" in allowed else None), False
        if dev.type == "cpu" and "bf16" in allowed and cpu_has_native_bf16():
            return torch.bfloat16, True
        return None, False
    dtype = _DTYPES[p]
    return dtype, dtype is not None and dev.type == "cpu"


def _training_dtype(precision, device, auto_precisions, on: str) -> torch.dtype | None:
    """:func:`resolve_precision`'s dtype where ``device`` is of type ``on``, else ``None``."""
    dtype, _ = resolve_precision(precision, device, auto_precisions)
    return dtype if _device(device).type == on else None


def training_autocast(
    precision: str | None, device: str | torch.device | None, auto_precisions: Sequence[str] = AUTO_PRECISIONS
) -> torch.dtype | None:
    """The autocast dtype of a training step at ``precision`` on ``device`` (``None``: float32).

    MONAI's trainers autocast on CUDA only (``torch.autocast("cuda", **amp_kwargs)`` with a
    ``GradScaler``: needed for float16, harmless for bfloat16): on CUDA this is :func:`resolve_precision`'s
    dtype, the bundles set their trainer's ``amp`` to ``training_autocast(...) is not None`` and its
    ``amp_kwargs`` with :func:`amp_kwargs`; on a CPU it is ``None`` here and the training inferer autocasts
    instead (:func:`cpu_training_autocast`).
    """
    return _training_dtype(precision, device, auto_precisions, "cuda")


def cpu_training_autocast(
    precision: str | None, device: str | torch.device | None, auto_precisions: Sequence[str] = AUTO_PRECISIONS
) -> torch.dtype | None:
    """The autocast dtype of a training step on a CPU (``None`` on CUDA, where the trainer's ``amp`` autocasts,
    and for float32): :func:`resolve_precision`'s dtype, e.g. bfloat16 for ``auto`` on a CPU with native
    bfloat16 or for ``--precision bf16``. The bundles wrap their training inferer in
    :class:`common.inferers.autocast.AutocastInferer` with it."""
    return _training_dtype(precision, device, auto_precisions, "cpu")


def amp_kwargs(
    precision: str | None, device: str | torch.device | None, auto_precisions: Sequence[str] = AUTO_PRECISIONS
) -> dict:
    """A MONAI trainer's ``amp_kwargs``: ``{"dtype": training_autocast(...)}``, float16 (torch's CUDA default)
    where that is float32, so that ``--amp true`` forced over ``--precision fp32`` keeps the old float16 AMP."""
    return {"dtype": training_autocast(precision, device, auto_precisions) or torch.float16}


#: PyTorch's switches for float32 on CUDA (cuDNN convolutions default to TF32, matmuls to IEEE)
_FP32_SWITCHES = ("cudnn.conv", "cudnn.rnn", "cuda.matmul")


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """float32 convolutions, RNNs and matmuls in IEEE float32 inside the block, also on CUDA, where
    PyTorch lets cuDNN convolutions use TF32 by default (a 10-bit mantissa, float16's rounding); the
    switches (``torch.backends.cudnn.conv.fp32_precision`` etc.) are restored after. No effect on a CPU."""
    switches = []
    for name in _FP32_SWITCHES:
        backend, op = name.split(".")
        switches.append(getattr(getattr(torch.backends, backend), op))
    before = [s.fp32_precision for s in switches]
    try:
        for s in switches:
            s.fp32_precision = "ieee"
        yield
    finally:
        for s, b in zip(switches, before):
            s.fp32_precision = b


def precision_name(dtype: torch.dtype | None, channels_last: bool = False) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` (+ ``" channels_last"``): the label logged and written in provenance."""
    name = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return name + (" channels_last" if channels_last else "")


def needs_grad_scaler(
    precision: str | None, device: str | torch.device | None, auto_precisions: Sequence[str] = AUTO_PRECISIONS
) -> bool:
    """Training in float16 on CUDA needs a ``GradScaler`` (bfloat16 and float32 do not)."""
    dtype, _ = resolve_precision(precision, device, auto_precisions)
    return dtype == torch.float16 and _device(device).type == "cuda"


def cast_float32(out):
    """``out`` (a tensor, or a tuple / list / dict of them) with its floating tensors as contiguous float32."""
    if isinstance(out, torch.Tensor):
        return out.float().contiguous() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(cast_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: cast_float32(v) for k, v in out.items()}
    return out


class PrecisionNetwork:
    """Call ``network`` under autocast to ``dtype`` (on its input's device type), with 4D (N, C, H, W)
    tensor inputs in channels-last layout when ``channels_last``, and its floating outputs cast back
    to contiguous float32: the code around the forward (schedulers, warps, the ConvLSTM chain's
    bookkeeping) never sees a reduced dtype. ``dtype=None`` calls ``network`` in IEEE float32
    (:func:`ieee_fp32`: no TF32 on CUDA), its output unchanged.

    With ``channels_last`` the network's own parameters are converted to channels-last here, once
    (values unchanged; only the memory layout of 4D weights changes; outside inference mode, so a
    network still being trained keeps trainable parameters).
    """

    def __init__(self, network, dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
        self.network, self.dtype, self.channels_last = network, dtype, bool(channels_last)
        if self.channels_last and isinstance(network, torch.nn.Module):
            # outside inference mode: the parameters must stay usable for training (validation runs)
            with torch.inference_mode(False), torch.no_grad():
                network.to(memory_format=torch.channels_last)

    @property
    def label(self) -> str:
        return precision_name(self.dtype, self.channels_last)

    def _layout(self, x):
        if isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        if self.dtype is None and not self.channels_last:
            # float32 even inside a caller's autocast (e.g. an evaluator's amp), in IEEE float32
            with ieee_fp32(), torch.autocast(device_type, enabled=False):
                return self.network(*args, **kwargs)
        if self.channels_last:
            args = tuple(self._layout(a) for a in args)
            kwargs = {k: self._layout(v) for k, v in kwargs.items()}
        with torch.autocast(device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.network(*args, **kwargs)
        return cast_float32(out)

    def __getattr__(self, name):  # the wrapped network's attributes (e.g. ``spatial_divisor``)
        if name in ("network", "dtype", "channels_last"):
            raise AttributeError(name)
        return getattr(self.network, name)


def check_precision(
    precision: str | None, auto_precisions: Sequence[str] = AUTO_PRECISIONS
) -> tuple[str, tuple[str, ...]]:
    """``(precision, auto_precisions)`` checked when an inferer is built (an unknown value is refused then,
    naming ``--precision`` or ``--auto_precisions``, not at the first forward)."""
    resolve_precision(precision, "cpu", auto_precisions)
    return ("auto" if precision in (None, "") else str(precision)), check_auto_precisions(auto_precisions)


def precision_network(
    network,
    precision: str | None,
    device: str | torch.device,
    auto_precisions: Sequence[str] = AUTO_PRECISIONS,
    logger=None,
    channels_last: bool = True,
) -> PrecisionNetwork:
    """``network`` wrapped at ``precision`` resolved on ``device`` (:func:`resolve_precision`); the choice
    (its ``label``, what provenance records) logged once to ``logger``; ``channels_last=False`` keeps the
    layout contiguous (3D networks)."""
    dtype, cl = resolve_precision(precision, device, auto_precisions)
    net = PrecisionNetwork(network, dtype, cl and channels_last)
    if logger is not None:
        log_precision_once(logger, net.label, device)
    return net


def log_precision_once(logger, label: str, device, what: str = "inference", _seen: set = set()) -> None:  # noqa: B006
    """Log the chosen precision of ``what`` ("inference", "training") once per (what, label, device) in this process."""
    key = (what, label, str(device))
    if key not in _seen:
        _seen.add(key)
        logger.info("%s precision: %s on %s", what, label, device)
