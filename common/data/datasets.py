"""Training and validation datasets whose cache fits the machine: :func:`make_dataset`.

Every bundle's ``train.json`` builds its ``train#dataset`` and ``validate#dataset`` here. The
*deterministic part* of a case (its transforms up to the first random one: reading, checks,
intensity scaling, concatenation) is computed once and kept, the random part (crops, flips) runs
every time the case is drawn, as MONAI's ``CacheDataset`` does. Where it is kept is the ``cache``
setting (``--cache``):

- ``"auto"`` (default): on disk in ``cache_dir`` when one is given (MONAI ``PersistentDataset``:
  memory does not grow with the dataset; the first epoch writes, later epochs and later runs read);
  otherwise in memory for as many cases as fit a memory budget (:class:`BudgetCacheDataset`): the
  budget is ``memory_budget_mib`` or ``memory_fraction`` (1/2) of the memory available when the
  dataset is built, divided by the processes of this node (``LOCAL_WORLD_SIZE``, set by ``torchrun``);
  the first case's cached size sets how many fit; the other cases run their deterministic part
  each time they are drawn.
- ``"memory"``: every case in memory (``CacheDataset``, ``cache_rate`` 1.0: the bundles' former default).
- ``"disk"``: ``PersistentDataset`` in ``cache_dir`` (required).
- ``"none"``: nothing kept (MONAI ``Dataset``).

The transform is flattened first (a ``Compose`` nested in a ``Compose`` is inlined), because MONAI
caches the transforms *directly* held by the outer ``Compose`` up to the first ``Randomizable`` one,
and a nested ``Compose`` counts as ``Randomizable``: the bundles' ``[@preprocessing] + @train#transforms``
would otherwise cache nothing at all. One log line per dataset says what is cached where::

    training dataset: 5 of 64 cases cached in memory (204.3 MiB each, 1022 MiB in all; budget 1024.0 MiB:
    --cache_memory_mib; the first 10 transforms, up to SelectItemsd), 59 run their deterministic part each
    time they are drawn; set --cache_dir DIR to keep them on disk

The disk cache names a file by the case's entry (file paths, id) and the names of the deterministic
transforms, not their settings: delete ``cache_dir`` after changing preprocessing settings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import Compose, Transform
from monai.transforms.transform import RandomizableTrait

__all__ = [
    "CACHE_MODES",
    "DEFAULT_MEMORY_FRACTION",
    "BudgetCacheDataset",
    "DiskCacheDataset",
    "allow_cached_types",
    "available_memory_bytes",
    "cache_rate_for_budget",
    "cached_nbytes",
    "cases_in_budget",
    "deterministic_part",
    "make_dataset",
    "memory_budget_bytes",
]

CACHE_MODES = ("auto", "memory", "disk", "none")
DEFAULT_MEMORY_FRACTION = 0.5
MIB = 2**20

logger = logging.getLogger(__name__)


def cached_nbytes(obj: Any) -> int:
    """Bytes held by the tensors and arrays in ``obj`` (a case dict, nested dicts/lists/tuples; a
    ``MetaTensor``'s affine in its meta counted too). Strings and numbers count 0."""
    if isinstance(obj, torch.Tensor):
        meta = getattr(obj, "meta", None)
        return obj.element_size() * obj.nelement() + (cached_nbytes(dict(meta)) if meta else 0)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(cached_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(cached_nbytes(v) for v in obj)
    return 0


def available_memory_bytes() -> int:
    """Memory the kernel can give new allocations now (``MemAvailable``, psutil's ``available``), bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # /proc/meminfo: "MemAvailable:   23711000 kB"
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise OSError(
            "cannot read the available memory (no psutil, no /proc/meminfo): set --cache_memory_mib"
        ) from None


def memory_budget_bytes(
    budget_mib: float | None = None,
    fraction: float = DEFAULT_MEMORY_FRACTION,
    available: int | None = None,
    local_world_size: int | None = None,
) -> int:
    """The in-memory cache budget of one process, bytes: ``budget_mib`` MiB when given (> 0), else
    ``fraction`` x ``available`` (default :func:`available_memory_bytes`) / ``local_world_size``
    (default ``$LOCAL_WORLD_SIZE``, 1): every process of a node caches its own copy."""
    if budget_mib is not None and float(budget_mib) > 0:
        return int(float(budget_mib) * MIB)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"memory_fraction {fraction}: must be in (0, 1]")
    avail = available_memory_bytes() if available is None else int(available)
    n_proc = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_world_size is None else int(local_world_size)
    return int(float(fraction) * avail / max(1, n_proc))


def cases_in_budget(n_cases: int, case_bytes: int, budget_bytes: int) -> int:
    """How many of ``n_cases`` cases of ``case_bytes`` each fit ``budget_bytes``: ``min(n, budget // case)``
    (all of them when a case holds no bytes)."""
    if n_cases <= 0:
        return 0
    if case_bytes <= 0:
        return n_cases
    return int(min(n_cases, max(0, budget_bytes) // case_bytes))


def cache_rate_for_budget(n_cases: int, case_bytes: int, budget_bytes: int) -> float:
    """The ``cache_rate`` (fraction of cases cached) that fits ``budget_bytes``: :func:`cases_in_budget` / ``n``
    (1.0 for an empty dataset)."""
    return 1.0 if n_cases <= 0 else cases_in_budget(n_cases, case_bytes, budget_bytes) / n_cases


def _first_random(transform: Compose) -> int | None:
    """Index of the first transform MONAI does not cache (random, or not a MONAI ``Transform``), as MONAI finds it."""
    return transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))


def deterministic_part(transform: Compose) -> str:
    """Words for the part MONAI caches: ``"the first 10 transforms, up to SelectItemsd"``."""
    n = _first_random(transform)
    n = len(transform.transforms) if n is None else n
    if n == 0:
        return "no transform (the first one is random)"
    return f"the first {n} transforms, up to {type(transform.transforms[n - 1]).__name__}"


class BudgetCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` that caches the first cases in memory only while they fit ``budget_bytes``.

    The first case's deterministic part is computed, its size (:func:`cached_nbytes`) gives how many
    cases fit (:func:`cases_in_budget`), and only those are computed and cached (in parallel, as
    ``CacheDataset`` does). Cases differ in size, so the cache is then measured and trimmed from the
    end until it fits. After construction: ``case_bytes`` (the first case), ``cached_bytes`` (all),
    ``cache_num`` (cases cached), ``cache_rate`` (``cache_num / len(data)``).

    Args:
        data: the datalist.
        transform: a ``Compose`` (or sequence of transforms); cached up to its first random transform.
        budget_bytes: the most bytes of cached tensors.
        kwargs: ``CacheDataset``'s (``num_workers``, ``progress``, ``copy_cache``, ...); ``cache_rate``,
            ``cache_num``, ``runtime_cache`` and ``hash_as_key`` are set here.
    """

    def __init__(self, data: Sequence, transform: Callable | Sequence[Callable], budget_bytes: int, **kwargs) -> None:
        self.budget_bytes = int(budget_bytes)
        self.case_bytes = 0
        self.cached_bytes = 0
        kwargs.update(cache_rate=1.0, cache_num=len(data), runtime_cache=False, hash_as_key=False)
        super().__init__(data=data, transform=transform, **kwargs)
        self.cache_rate = self.cache_num / len(self.data) if len(self.data) else 1.0

    def _fill_cache(self, indices=None) -> list:
        indices = list(range(self.cache_num)) if indices is None else list(indices)
        if not indices:
            return []
        first = self._load_cache_item(indices[0])
        self.case_bytes = cached_nbytes(first)
        n = cases_in_budget(len(indices), self.case_bytes, self.budget_bytes)
        if n == 0:
            self.cache_num = 0
            return []
        self.cache_num = n
        cache = [first] + (super()._fill_cache(indices[1:n]) if n > 1 else [])
        sizes = [cached_nbytes(c) for c in cache]
        while cache and sum(sizes) > self.budget_bytes:  # a later case larger than the first
            cache.pop()
            sizes.pop()
        self.cache_num = len(cache)
        self.cached_bytes = sum(sizes)
        return cache


def allow_cached_types() -> None:
    """Let ``torch.load(weights_only=True)`` read the disk cache: a cached case holds ``MetaTensor`` meta
    with MONAI's enums (``TraceKeys``, ``SpaceKeys`` ...) and numpy arrays (affines). Only these
    data-only types are allow-listed (numpy's array reconstructor, ``ndarray``, ``dtype`` and its
    classes, MONAI's ``Enum`` classes), so a file in the cache folder still cannot run code."""
    import enum

    import monai.utils.enums as monai_enums

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    enums = [
        v for v in vars(monai_enums).values() if isinstance(v, type) and issubclass(v, enum.Enum) and v is not enum.Enum
    ]
    dtype_classes = [
        type(np.dtype(t))
        for t in (
            np.float16,
            np.float32,
            np.float64,
            np.int8,
            np.uint8,
            np.int16,
            np.uint16,
            np.int32,
            np.uint32,
            np.int64,
            np.uint64,
            np.bool_,
        )
    ]
    torch.serialization.add_safe_globals([_reconstruct, np.ndarray, np.dtype, *dtype_classes, *enums])


class DiskCacheDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` whose cached files load with ``torch.load(weights_only=True)`` in every
    process, DataLoader workers started by ``spawn`` included (:func:`allow_cached_types` before the first read)."""

    _allowed_in: int | None = None

    def _cachecheck(self, item_transformed):
        if DiskCacheDataset._allowed_in != os.getpid():
            allow_cached_types()
            DiskCacheDataset._allowed_in = os.getpid()
        return super()._cachecheck(item_transformed)


def _flat(transform: Callable | Sequence[Callable] | None) -> Compose:
    """``transform`` as one flat ``Compose`` (nested ``Compose`` inlined) so MONAI finds its deterministic part."""
    if transform is None:
        return Compose([])
    comp = transform if isinstance(transform, Compose) else Compose(transform)
    return comp.flatten()


def make_dataset(
    data: Sequence,
    transform: Callable | Sequence[Callable] | None,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    memory_budget_mib: float | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    num_workers: int | None = 1,
    name: str = "training",
    progress: bool = False,
) -> Dataset:
    """A MONAI dataset of ``data`` whose deterministic part is cached per ``cache`` (module docstring).

    Args:
        data: the datalist (list of dicts of file paths).
        transform: the whole chain (deterministic then random); nested ``Compose`` are flattened.
        cache: ``"auto"``, ``"memory"``, ``"disk"`` or ``"none"`` (config id ``cache``).
        cache_dir: folder of the disk cache (config id ``cache_dir``; ``""``/``None``: none); this
            dataset writes under ``<cache_dir>/<name>``. Cached files are named by the case's file
            paths and the names of the deterministic transforms: delete the folder after changing
            preprocessing settings (percentiles, label set ...).
        memory_budget_mib: the in-memory budget for ``auto`` in MiB (config id ``cache_memory_mib``;
            ``None``/0: ``memory_fraction`` of the available memory).
        memory_fraction: fraction of the available memory ``auto`` may use when no budget is given.
        num_workers: threads computing the in-memory cache.
        name: the dataset's name in the log line and the disk cache's subfolder.
        progress: show MONAI's caching progress bar.
    """
    mode = str(cache).strip().lower()
    if mode not in CACHE_MODES:
        raise ValueError(f"--cache {cache!r}: must be one of {', '.join(CACHE_MODES)}")
    folder = str(cache_dir).strip() if cache_dir not in (None, "", False) else ""
    if mode == "disk" and not folder:
        raise ValueError("--cache disk needs --cache_dir DIR (a folder for the cached cases)")
    if mode == "auto":
        mode = "disk" if folder else "budget"
    comp = _flat(transform)
    part = deterministic_part(comp)
    n = len(data)
    workers = max(1, int(num_workers or 1))

    if mode == "none":
        logger.info("%s dataset: %d cases, nothing cached (--cache none): every draw runs all transforms", name, n)
        return Dataset(data=data, transform=comp)
    if mode == "disk":
        where = Path(folder).expanduser() / name
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--cache_dir {folder}: cannot create the cache folder ({e.strerror or e})") from None
        before = len(list(where.glob("*.pt")))
        ds = DiskCacheDataset(data=data, transform=comp, cache_dir=where, hash_transform=json_hashing, track_meta=True)
        logger.info(
            "%s dataset: %d cases cached on disk in %s (%s; %d files there already, the others written when first drawn), "
            "nothing in memory",
            name,
            n,
            where,
            part,
            before,
        )
        return ds
    if mode == "memory":
        ds = CacheDataset(data=data, transform=comp, cache_rate=1.0, num_workers=workers, progress=progress)
        total = sum(cached_nbytes(c) for c in ds._cache)
        logger.info(
            "%s dataset: all %d cases cached in memory (--cache memory; %s), %.0f MiB", name, n, part, total / MIB
        )
        return ds
    budget = memory_budget_bytes(memory_budget_mib, memory_fraction)
    ds = BudgetCacheDataset(data=data, transform=comp, budget_bytes=budget, num_workers=workers, progress=progress)
    how = (
        "--cache_memory_mib"
        if memory_budget_mib is not None and float(memory_budget_mib) > 0
        else f"{memory_fraction:g} of the available memory"
    )
    rest = n - ds.cache_num
    tail = (
        f", {rest} run their deterministic part each time they are drawn; set --cache_dir DIR to keep them on disk"
        if rest
        else ""
    )
    logger.info(
        "%s dataset: %d of %d cases cached in memory (%.1f MiB each, %.0f MiB in all; budget %.1f MiB: %s; %s)%s",
        name,
        ds.cache_num,
        n,
        ds.case_bytes / MIB,
        ds.cached_bytes / MIB,
        budget / MIB,
        how,
        part,
        tail,
    )
    return ds
