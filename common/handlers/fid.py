"""FID of synthesised slices against the acquired ones, per output channel (phase), as an ignite handler.

Optional part of a bundle's evaluation: it needs a LOCAL feature-extractor file
(:class:`common.metrics.perceptual.FIDScore`; nothing is downloaded). Features are taken per case as
the evaluator runs, so cases of different grids can be pooled; the distance is computed at the end.

Each axial slice of a case becomes one image. Target, prediction and baselines are normalised with
the target phase's percentile range, per case and phase (:func:`common.handlers.metrics.channel_ranges`,
as :func:`common.handlers.metrics.score_case` does), so the extractor sees the same [0, 1] intensity scale
for every method.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.handlers.metrics import channel_ranges
from common.handlers.writer import as_numpy
from common.io import save_json
from common.metrics import write_case_csv

logger = logging.getLogger(__name__)

__all__ = ["SynthesisFID"]


class SynthesisFID:
    """Fréchet distance between synthesised and acquired slices, for the model and each baseline.

    Args:
        extractor_path: TorchScript (or ``.pt2``) feature extractor, see
            :class:`common.metrics.perceptual.FIDScore`. A path that does not exist raises
            ``FileNotFoundError`` at construction (before any synthesis runs).
        output_dir: where ``fid.csv`` and ``fid.json`` go.
        output_names: one name per output channel.
        baselines: names of the trivial baselines present as ``baseline_<name>`` in the outputs.
        method: the model's name in the table.
        mask_key: if given, only slices where this mask (datalist key) is non-empty are used.
        percentiles: the target's percentiles mapped to [0, 1].
        device: device of the extractor.
    """

    def __init__(
        self,
        extractor_path: str | os.PathLike,
        output_dir: str | os.PathLike,
        output_names: Sequence[str],
        baselines: Sequence[str] = (),
        method: str = "model",
        mask_key: str | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5),
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        from common.metrics.perceptual import FIDScore

        self.fid = FIDScore(extractor_path, device=device, batch_size=batch_size)
        self.output_dir = Path(output_dir)
        self.output_names = list(output_names)
        self.baselines = list(baselines)
        self.method = method
        self.mask_key = mask_key
        self.percentiles = tuple(percentiles)
        self.features: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.results: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.COMPLETED, self.on_completed)

    def _slices(self, vol: np.ndarray, keep: np.ndarray) -> torch.Tensor:
        """(H, W, D) -> (N, 1, H, W) for the kept slices."""
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[..., keep], -1, 0)[:, None])).float()

    def _add(self, name: str, phase: str, images: torch.Tensor) -> None:
        self.features.setdefault((name, phase), []).append(self.fid.features(images))

    def on_iteration(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            if out.get("label") is None:
                continue
            target = as_numpy(out["label"])
            keep = np.ones(target.shape[-1], bool)
            if self.mask_key and item.get(self.mask_key) is not None:
                keep = (as_numpy(item[self.mask_key])[0] > 0.5).any(axis=(0, 1))
            if not keep.any():
                continue
            lo, scale = channel_ranges(target, self.percentiles)
            methods = {"real": target, self.method: as_numpy(out["pred"])}
            for b in self.baselines:
                value = out.get(f"baseline_{b}")
                value = item.get(f"baseline_{b}") if value is None else value
                if value is None:
                    raise KeyError(f"baseline {b!r} (key 'baseline_{b}') is in neither the output nor the batch")
                methods[b] = as_numpy(value)
            for name, vol in methods.items():
                for c, phase in enumerate(self.output_names):
                    self._add(name, phase, self._slices((vol[c] - lo[c]) / scale[c], keep))

    def on_completed(self, engine: Engine) -> None:
        if not self.features:
            logger.warning("FID: no case had a target: nothing to compare")
            return
        rows = []
        for phase in self.output_names:
            real = torch.cat(self.features[("real", phase)])
            for name in [self.method, *self.baselines]:
                fake = torch.cat(self.features[(name, phase)])
                rows.append(
                    {
                        "method": name,
                        "phase": phase,
                        "fid": self.fid.from_features(fake, real),
                        "n_slices": int(real.shape[0]),
                        "n_features": int(real.shape[1]),
                    }
                )
        self.results = rows
        write_case_csv(rows, self.output_dir / "fid.csv")
        save_json({"fid": rows}, self.output_dir / "fid.json")
        for r in rows:
            note = "  (fewer slices than feature dimensions: unreliable)" if r["n_slices"] <= r["n_features"] else ""
            logger.info("FID %s / %s: %.4g over %d slices%s", r["method"], r["phase"], r["fid"], r["n_slices"], note)
        print(f"FID: {self.output_dir / 'fid.csv'}")
