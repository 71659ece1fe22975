"""CAG-UDA: category anchor-guided unsupervised domain adaptation for semantic segmentation.

A thin package behind the book: ``labels`` and ``metrics`` (protocols and mIoU),
``models`` (DeepLab-v3+ / v2), ``anchors``, ``pseudo_labels`` and ``losses`` (the paper's
rules), ``data`` (GTA5, SYNTHIA, Cityscapes and the built-in benchmark), and the training
stages that chain them.
"""
__version__ = "0.1.0"
