"""Router training (`dynpose-train-router`) and routing calibration.

A crop's path through training: `collect.gt_crops` (ground-truth boxes) -> `collect.collect_outputs` (both pose models,
OKS and joint distances, cached) -> `targets.make_targets` -> `collect.router_crops` -> `train.train_router`
-> `train.save_checkpoint` (DynPose release format) -> `dynpose.export.api.export_model` (the engine dir's router).
Calibration: `calibrate.calibrate` -> `Manifest.route`.
"""
