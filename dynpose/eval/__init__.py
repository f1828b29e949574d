"""Evaluation: COCO-style keypoint AP/AR via pycocotools (`coco`) and MPII PCKh (`mpii`)."""

from dynpose.eval.coco import evaluate_results
from dynpose.eval.mpii import pckh

__all__ = ["evaluate_results", "pckh"]
