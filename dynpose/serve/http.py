"""HTTP side of the ingress: read a bounded body, parse a pose request, answer one-line JSON errors.

A pose request comes in three shapes, all to `POST /v1/pose`:

- JSON `{"image": "<base64 JPEG/PNG>", "boxes": [[x,y,w,h(,score)], ...], "route": "..."}` (boxes and route
  optional);
- multipart form with an `image` file and optional `boxes` (the same JSON list, as text) and `route` fields, so
  `curl -F image=@photo.jpg -F 'boxes=[[10,20,100,200]]' URL` works;
- the encoded image as the whole body (`Content-Type: image/jpeg` or `image/png`), boxes and route in the query
  string (`?boxes=[[...]]&route=all-large`).

Every problem with a request is an `HttpError` (status + one-line message) the ingress answers as
`{"error": "..."}`; nothing here decodes the image (the ingress does that off the event loop).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import parse_json

POSE_FIELDS = ("image", "boxes", "route")


class HttpError(Exception):
    """A request the service refuses: `status` (4xx, or 503 for a replica that went away) and a one-line message;
    `close`: answer with `Connection: close` (the proxy then closes the connection: a cut upload, a draining
    service)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None, close: bool = False) -> None:
        super().__init__(one_line(message))
        self.status = status
        self.message = one_line(message)
        self.retry_after_s = retry_after_s
        self.close = close


def one_line(text: str, limit: int = 400) -> str:
    """Errors go back as one line: the first line of a message, cut at `limit` characters."""
    line = (str(text).strip().splitlines() or [""])[0].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class PoseRequest:
    """One parsed request: the encoded image, its boxes ((M,4|5) float64; None: run the detector), a route."""

    image: bytes
    boxes: np.ndarray | None
    route: str | None


async def read_body(receive_stream: Any, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes: by its Content-Length before reading anything, and
    while streaming (a chunked upload has none)."""
    mb = limit / (1 << 20)
    declared = headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HttpError(400, f"Content-Length {declared!r} is not a number") from None
        if n > limit:
            raise HttpError(413, f"request body is {n:,} bytes, over the service's limit of {mb:g} MB (--max-body-mb)")
    parts: list[bytes] = []
    size = 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body is over the service's limit of {mb:g} MB (--max-body-mb)")
        parts.append(chunk)
    return b"".join(parts)


def parse_boxes(value: Any, max_boxes: int) -> np.ndarray | None:
    """A request's `boxes`: None (absent or null: run the detector) or a list of [x,y,w,h] / [x,y,w,h,score]."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_json(value, "boxes", hint="send [[x,y,w,h(,score)], ...]")
        except DynPoseError as e:
            raise HttpError(400, str(e)) from None
        if value is None:
            return None
    if not isinstance(value, list):
        raise HttpError(400, f"boxes: expected a list of [x,y,w,h(,score)], got {type(value).__name__}")
    if not value:
        return np.zeros((0, 4))
    rows = [r for r in value if isinstance(r, list) and all(_is_number(v) for v in r)]
    if len(rows) != len(value) or len({len(r) for r in rows}) != 1 or len(rows[0]) not in (4, 5):
        raise HttpError(400, "boxes: every box must be a list of 4 or 5 numbers [x,y,w,h(,score)], all of the same length")
    if len(rows) > max_boxes:
        raise HttpError(413, f"boxes: {len(rows)} boxes, over the service's limit of {max_boxes} per request")
    return np.asarray(rows, dtype=np.float64)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_route(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise HttpError(400, "route: expected a routing policy string such as band:0.59,0.69 or all-large")
    return value.strip()


def parse_json_request(body: bytes, max_boxes: int) -> PoseRequest:
    try:  # the one JSON reader: malformed, too deeply nested or too long a number are all a 400
        d = parse_json(body, "request body", hint='send {"image": "<base64>", ...} or a multipart form')
    except DynPoseError as e:
        raise HttpError(400, str(e)) from None
    if not isinstance(d, dict):
        raise HttpError(400, f"request body: expected a JSON object with {', '.join(POSE_FIELDS)}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(POSE_FIELDS))
    if unknown:
        raise HttpError(400, f"request body: unknown field(s) {unknown}; the fields are {', '.join(POSE_FIELDS)}")
    image = d.get("image")
    if not isinstance(image, str) or not image:
        raise HttpError(400, "image: missing; send the JPEG/PNG file's bytes as a base64 string")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "image: not valid base64; send the JPEG/PNG file's bytes as a base64 string") from None
    return PoseRequest(data, parse_boxes(d.get("boxes"), max_boxes), parse_route(d.get("route")))


async def parse_multipart(scope: MutableMapping[str, Any], body: bytes, max_boxes: int) -> PoseRequest:
    """A multipart (or url-encoded) form, parsed by Starlette (python-multipart) from the body already read."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, Any]:  # replays the bounded body we read
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=8)
    except Exception as e:  # python-multipart / Starlette raise their own parse errors
        raise HttpError(400, f"multipart form: cannot be parsed ({one_line(str(e)) or type(e).__name__})") from None
    try:
        unknown = sorted(set(form.keys()) - set(POSE_FIELDS))
        if unknown:
            raise HttpError(400, f"form: unknown field(s) {unknown}; the fields are {', '.join(POSE_FIELDS)}")
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise HttpError(400, "form: no 'image' file; send the file as -F image=@photo.jpg")
        data = await image.read()
        route = form.get("route")
        return PoseRequest(
            data, parse_boxes(form.get("boxes"), max_boxes), parse_route(route if isinstance(route, str) else None)
        )
    finally:
        await form.close()


async def parse_pose_request(
    scope: MutableMapping[str, Any], headers: Mapping[str, str], query: Mapping[str, str], body: bytes, max_boxes: int
) -> PoseRequest:
    """The request, whichever of the three shapes it came in (by Content-Type)."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await parse_multipart(scope, body, max_boxes)
    if ctype.startswith("image/"):
        unknown = sorted(set(query) - {"boxes", "route"})
        if unknown:
            raise HttpError(400, f"query: unknown parameter(s) {unknown}; use boxes and route")
        return PoseRequest(body, parse_boxes(query.get("boxes"), max_boxes), parse_route(query.get("route")))
    if ctype in ("", "application/json", "text/json"):
        return parse_json_request(body, max_boxes)
    raise HttpError(
        415,
        f"Content-Type {ctype!r}: send application/json, multipart/form-data, or the image itself (image/jpeg, image/png)",
    )


def decode_request_image(data: bytes, max_pixels: int) -> np.ndarray:
    """The request's image as BGR uint8: 413 when its header claims more than `max_pixels` (checked before any
    decoding, for every format OpenCV decodes: `dynpose.io.imagesize`), 400 when it cannot be decoded."""
    from dynpose.io.imagesize import ImageTooLarge
    from dynpose.io.sources import decode_image_bytes

    try:
        image = decode_image_bytes(data, "image", max_pixels)
    except ImageTooLarge as e:
        raise HttpError(
            413, f"image: {e.width} x {e.height} pixels by its header, over the service's limit of {max_pixels:,}"
        ) from None
    except DynPoseError as e:
        raise HttpError(400, f"{e}; send a JPEG or PNG file") from None
    h, w = image.shape[:2]
    if h * w > max_pixels:  # a format whose header was not read: never pass the pixels on (crops, the detector)
        raise HttpError(413, f"image: {w} x {h} pixels once decoded, over the service's limit of {max_pixels:,}")
    return image
