"""The route an engine dir gets when a router is written into it (`default_route`)."""

from __future__ import annotations

from dynpose.engines.manifest import DEFAULT_ROUTE, Manifest
from dynpose.errors import DynPoseError

# Where a router's weights came from; decides the engine dir's default route.
ROUTER_WEIGHTS = ("random", "checkpoint", "trained")
# A route that means something for any router: half the crops (those scored highest) go to the large model.
UNTUNED_ROUTE = "fraction:0.5"


def default_route(manifest: Manifest, router_weights_kind: str) -> tuple[str, str]:
    """The route an engine dir gets when a router of this kind is written into it, and one line saying why.

    A route chosen by `dynpose-train-router --calibrate` (`Manifest.calibration`) is kept whatever the router.
    Otherwise: DynPose's release band 0.59,0.69 for a router loaded from a checkpoint (it is tuned to the released
    router's scores); `fraction:0.5` for random weights (their scores barely vary, ~0.488 on every crop, so the band
    would send every crop to the small model) and for a freshly trained router (its scores are not the release's).
    """
    if router_weights_kind not in ROUTER_WEIGHTS:
        raise DynPoseError(f"router weights kind {router_weights_kind!r}: use one of {ROUTER_WEIGHTS}")
    if manifest.calibration is not None:
        return manifest.route, (
            f"route {manifest.route} kept: chosen by `dynpose-train-router --calibrate` (re-run it "
            "when the router's weights change)"
        )
    if router_weights_kind == "random":
        return UNTUNED_ROUTE, (
            f"route {UNTUNED_ROUTE}: the router has random weights, and DynPose's band "
            f"{DEFAULT_ROUTE.partition(':')[2]} (tuned to the released router) would send every crop "
            "to the small model"
        )
    if router_weights_kind == "trained":
        return UNTUNED_ROUTE, (
            f"route {UNTUNED_ROUTE} for the freshly trained router until `dynpose-train-router "
            f"--calibrate` chooses one (DynPose's band {DEFAULT_ROUTE.partition(':')[2]} fits the "
            "released router's scores, not a retrained one's)"
        )
    return DEFAULT_ROUTE, (
        f"route {DEFAULT_ROUTE}: DynPose's release rule (tuned to the released router; "
        "`dynpose-train-router --calibrate` chooses one for another router)"
    )
