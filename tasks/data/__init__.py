"""Datasets, transforms and LightningDataModules (COCO detection, VOC segmentation, synthetic data)."""

import cv2

# OpenCV's thread pool does not survive fork(): once cv2 has run a parallel loop in a process
# (writing the synthetic data, decoding a validation image), DataLoader workers forked from it
# hang in their first cv2 call. Single-threaded OpenCV keeps forked workers safe; the loaders
# already run one process per core.
cv2.setNumThreads(0)
