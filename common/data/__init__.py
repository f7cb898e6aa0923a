"""Datalists: sections of a prepared dataset's ``datalist.json``, one case folder, or any folder of volumes."""

from common.data.datalist import HOW_TO_MAKE_DATA, case_or_datalist, load_datalist
from common.data.volumes import volume_datalist, volume_or_datalist

__all__ = ["HOW_TO_MAKE_DATA", "case_or_datalist", "load_datalist", "volume_datalist", "volume_or_datalist"]
