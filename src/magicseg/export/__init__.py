"""Export the kept dataset (the ``filter`` stage's output) for other toolkits.

- :mod:`magicseg.export.coco`: COCO JSON with RLE masks (needs ``pycocotools``).
- :mod:`magicseg.export.hf`: a Hugging Face ``datasets`` export: Parquet shards, a
  ``DatasetDict`` saved to disk, and a dataset card (:mod:`magicseg.export.card`); pushed to the
  hub by :mod:`magicseg.export.push` (needs ``datasets``, the ``hf`` extra).

Heavy libraries (``pycocotools``, ``datasets``, ``huggingface_hub``) are imported inside the
functions that use them.
"""

from magicseg.export.coco import export_coco, mask_annotations
from magicseg.export.hf import export_hf

__all__ = ["export_coco", "export_hf", "mask_annotations"]
