"""Datalists: sections of a prepared dataset's ``datalist.json``, one case folder, or any folder of volumes;
the training and validation datasets built on them, with a bounded cache (:func:`make_dataset`)."""

from common.data.datalist import HOW_TO_MAKE_DATA, case_or_datalist, load_datalist
from common.data.datasets import make_dataset
from common.data.volumes import volume_datalist, volume_or_datalist

__all__ = [
    "HOW_TO_MAKE_DATA",
    "case_or_datalist",
    "load_datalist",
    "make_dataset",
    "volume_datalist",
    "volume_or_datalist",
]
