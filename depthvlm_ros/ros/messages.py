"""Conversions between ROS 2 messages and numpy arrays (the jobs of cv_bridge and sensor_msgs_py).

Every function checks what arrives from the outside (encoding, step, buffer length, sizes) and
raises :class:`~depthvlm_ros.errors.InputError` with one line saying what is wrong.
Images are ``(H, W, 3)`` uint8 RGB; depth is ``(H, W)`` float32 metres (NaN invalid, REP 117/118);
points are in the image's optical frame (x right, y down, z forward, metres; REP 103).
"""

from __future__ import annotations

import array
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from geometry_msgs.msg import Point
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

from depthvlm_ros.errors import InputError, shown
from depthvlm_ros.geometry import (
    MAX_IMAGE_SIDE,
    Intrinsics,
    depth_to_16uc1,
    depth_to_32fc1,
    intrinsics_for_image,
)

#: Input encodings: channels in the buffer and the channel order that gives RGB.
IMAGE_ENCODINGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}
#: Depth encodings the node publishes (REP 118).
DEPTH_ENCODINGS = ("32FC1", "16UC1")
#: Largest compressed image accepted, in bytes (a 8192x8192 PNG of noise is ~200 MB; real ones less).
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024


class MessageBuffer:
    """A reusable byte buffer for one topic's message ``data`` (the cheap way to build big messages).

    rclpy copies a message's data when it publishes, and a message built with ``check_fields=True``
    keeps an ``array.array('B')`` as its data without copying it. So a publisher's large payload
    (a cloud, a depth image) is written straight into this buffer, wrapped, published, and the
    buffer is written again for the next frame: no allocation, no ``tobytes``, no page faults.
    One buffer per publisher, used by one thread.
    """

    def __init__(self) -> None:
        self.data = array.array("B")

    def array(self, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
        """A writable numpy view of exactly ``shape`` x ``dtype`` bytes (resized when that changes)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if len(self.data) != nbytes:
            self.data = array.array("B", bytes(nbytes))
        return np.frombuffer(self.data, dtype=dtype).reshape(shape)


def _byte_data(values: np.ndarray, buffer: MessageBuffer | None) -> array.array:
    """``values``' bytes as a message's ``data``: copied once, into ``buffer`` when given."""
    if buffer is None:
        buffer = MessageBuffer()
    out = buffer.array(values.dtype, values.shape)
    if out.__array_interface__["data"][0] != values.__array_interface__["data"][0]:  # not written in place
        np.copyto(out, values)
    return buffer.data


def _check_size(what: str, width: int, height: int) -> None:
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise InputError(f"{what}: size {width}x{height} outside 1..{MAX_IMAGE_SIDE} pixels", f"{what}.size")


def check_image(msg: Image | CompressedImage) -> None:
    """What an image message declares, checked before it is kept anywhere (the node's image callback):
    a known encoding, a size within bounds, a step that holds a row, a buffer of exactly step x height
    bytes; a compressed image within :data:`MAX_COMPRESSED_BYTES`. Decoding checks the pixels later."""
    if isinstance(msg, CompressedImage):
        if len(msg.data) == 0:
            raise InputError("compressed image: no data", "compressed.empty")
        if len(msg.data) > MAX_COMPRESSED_BYTES:
            raise InputError(f"compressed image: {len(msg.data)} bytes exceeds {MAX_COMPRESSED_BYTES}",
                             "compressed.bytes")
        return
    encoding = msg.encoding.lower()
    if encoding not in IMAGE_ENCODINGS:
        raise InputError(f"image: unsupported encoding {shown(msg.encoding)} (use {', '.join(IMAGE_ENCODINGS)})",
                         "image.encoding")
    channels, _ = IMAGE_ENCODINGS[encoding]
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size("image", width, height)
    if step < width * channels:
        raise InputError(f"image: step {step} < width {width} x {channels} bytes per pixel ({encoding})",
                         "image.step")
    if len(msg.data) != step * height:
        raise InputError(f"image: data has {len(msg.data)} bytes, expected step {step} x height {height}",
                         "image.length")


def image_to_rgb(msg: Image) -> np.ndarray:
    """A ``sensor_msgs/Image`` (rgb8, bgr8, rgba8, bgra8, mono8) as an (H, W, 3) uint8 RGB array.

    Rows may be padded (``step`` > width x channels). The result never aliases the message.
    """
    check_image(msg)
    channels, order = IMAGE_ENCODINGS[msg.encoding.lower()]
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)
    pixels = rows[:, : width * channels].reshape(height, width, channels)
    if order == (0, 1, 2) and channels == 3:
        return pixels.copy()
    return np.ascontiguousarray(pixels[:, :, list(order)])


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (8-bit JPEG or PNG) as (H, W, 3) uint8 RGB.

    The header is read first and the size checked before any pixel is decoded (no decompression
    bombs); only JPEG and PNG are tried, and a 16-bit PNG is refused, not cut to 8 bits
    (:mod:`depthvlm_ros.imageio`).
    """
    from depthvlm_ros.imageio import COMPRESSED_FORMATS, read_rgb

    check_image(msg)
    what = f"compressed image ({shown(msg.format)})"
    try:
        return read_rgb(bytes(msg.data), what, COMPRESSED_FORMATS)
    except InputError as exc:
        raise InputError(f"{what}: cannot decode ({str(exc).removeprefix(what + ': ')})", "compressed.decode") from None


def rgb_to_image(rgb: np.ndarray, header: Header, buffer: MessageBuffer | None = None) -> Image:
    """An (H, W, 3) uint8 RGB array as an rgb8 ``sensor_msgs/Image`` (copied once, into ``buffer`` if given)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    return Image(check_fields=True, header=header, height=height, width=width, encoding="rgb8", is_bigendian=0,
                 step=width * 3, data=_byte_data(rgb, buffer))


def rgb_to_compressed(rgb: np.ndarray, header: Header, fmt: str = "jpeg", quality: int = 90) -> CompressedImage:
    """An RGB array as a JPEG or PNG ``sensor_msgs/CompressedImage``."""
    from PIL import Image as PILImage

    out = io.BytesIO()
    kind = "JPEG" if fmt.lower() in ("jpeg", "jpg") else "PNG"
    PILImage.fromarray(np.asarray(rgb, dtype=np.uint8)).save(out, kind, quality=quality)
    return CompressedImage(header=header, format=kind.lower(), data=out.getvalue())


def depth_to_image(depth: np.ndarray, header: Header, encoding: str = "32FC1",
                   buffer: MessageBuffer | None = None) -> Image:
    """Depth (H, W) metres as a REP 118 image: 32FC1 metres (NaN invalid) or 16UC1 mm (0 invalid).

    ``buffer``: the publisher's reusable :class:`MessageBuffer` (the depth is copied into it once).
    """
    if encoding == "32FC1":
        data, step_bytes = depth_to_32fc1(depth), 4
    elif encoding == "16UC1":
        data, step_bytes = depth_to_16uc1(depth), 2
    else:
        raise InputError(f"depth encoding {encoding!r} (use {' or '.join(DEPTH_ENCODINGS)})")
    height, width = data.shape
    return Image(check_fields=True, header=header, height=height, width=width, encoding=encoding,
                 is_bigendian=int(np.little_endian is False), step=width * step_bytes,
                 data=_byte_data(np.ascontiguousarray(data), buffer))


#: image_transport's compressed_depth defaults: inverse-depth quantisation (depthQuantA = q (q + 1)).
COMPRESSED_DEPTH_QUANTIZATION = 100.0


def depth_to_compressed_depth(depth: np.ndarray, header: Header, encoding: str = "32FC1",
                              depth_max_m: float = 10.0) -> CompressedImage:
    """Depth (H, W) metres as image_transport's ``compressedDepth`` (what RViz and Foxglove decode).

    ``format`` is ``"<encoding>; compressedDepth png"``; ``data`` is a 12-byte little-endian header (int32
    format 0 = inverse depth, float32 depthQuantA, float32 depthQuantB) followed by a 16-bit PNG. 32FC1: the
    PNG holds ``uint16(A / depth + B)`` with A = q (q + 1), q = 100, B = 1 - A / depth_max_m; 0 where the depth
    is invalid or at least ``depth_max_m`` (a decoder computes A / (value - B)). 16UC1: the PNG holds the
    millimetres as published (0 invalid and beyond ``depth_max_m``), the header's parameters 0.
    """
    import struct

    from PIL import Image as PILImage

    depth = np.asarray(depth, dtype=np.float32)
    if encoding == "32FC1":
        a = np.float32(COMPRESSED_DEPTH_QUANTIZATION * (COMPRESSED_DEPTH_QUANTIZATION + 1.0))
        b = np.float32(1.0 - a / np.float32(depth_max_m))
        valid = np.isfinite(depth) & (depth > 0) & (depth < depth_max_m)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = np.where(valid, a / np.where(valid, depth, 1) + b, 0)
        values = np.clip(inverse, 0, 65535).astype(np.uint16)  # truncation, as the C++ encoder's conversion
        config = struct.pack("<iff", 0, float(a), float(b))
    elif encoding == "16UC1":
        values = depth_to_16uc1(depth)
        values[values > int(depth_max_m * 1000.0)] = 0
        config = struct.pack("<iff", 0, 0.0, 0.0)
    else:
        raise InputError(f"depth encoding {encoding!r} (use {' or '.join(DEPTH_ENCODINGS)})")
    out = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(values)).save(out, "PNG", compress_level=1)
    return CompressedImage(header=header, format=f"{encoding}; compressedDepth png", data=config + out.getvalue())


def image_to_depth(msg: Image) -> np.ndarray:
    """A REP 118 depth image (32FC1 metres or 16UC1 millimetres) as float32 metres, NaN invalid."""
    from depthvlm_ros.geometry import depth_from_16uc1

    kinds: dict[str, np.dtype[Any]] = {"32FC1": np.dtype(np.float32), "16UC1": np.dtype(np.uint16)}
    if msg.encoding not in kinds:
        raise InputError(f"depth image: unsupported encoding {shown(msg.encoding)} (use 32FC1 or 16UC1)",
                         "depth.encoding")
    dtype = kinds[msg.encoding].newbyteorder(">" if msg.is_bigendian else "<")
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size("depth image", width, height)
    if step < width * dtype.itemsize or len(msg.data) != step * height:
        raise InputError(f"depth image: step {step} / {len(msg.data)} bytes do not fit {width}x{height}")
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)[:, : width * dtype.itemsize]
    values = np.ascontiguousarray(rows).view(dtype).reshape(height, width).astype(dtype.newbyteorder("="))
    if msg.encoding == "16UC1":
        return depth_from_16uc1(values)
    return depth_to_32fc1(values)


def camera_info_to_intrinsics(msg: CameraInfo, width: int | None = None, height: int | None = None) -> Intrinsics:
    """Intrinsics of a ``CameraInfo`` (P's left 3x3 when set, else K), for an image of ``width`` x ``height``.

    A camera_info of another but proportional size is scaled to the image; another aspect ratio, a
    zero or NaN K, or a zero size is an InputError.
    """
    cw, ch = int(msg.width), int(msg.height)
    if cw == 0 or ch == 0:
        raise InputError("camera_info: width/height are 0 (uncalibrated camera?)", "camera_info.size")
    k = np.asarray(msg.k, dtype=np.float64)
    p = np.asarray(msg.p, dtype=np.float64)
    if not np.all(np.isfinite(k)) or not np.all(np.isfinite(p)):
        raise InputError("camera_info: K or P has NaN or infinite entries", "camera_info.finite")
    if k[0] <= 0 or k[4] <= 0:
        if p[0] <= 0 or p[5] <= 0:
            raise InputError(f"camera_info: focal lengths must be positive (K fx={k[0]:.6g}, fy={k[4]:.6g})",
                             "camera_info.focal")
    intrinsics = Intrinsics.from_mapping({"width": cw, "height": ch, "k": k, "p": p})
    if width is None or height is None:
        return intrinsics
    return intrinsics_for_image(intrinsics, int(width), int(height))


def intrinsics_to_camera_info(intrinsics: Intrinsics, header: Header) -> CameraInfo:
    """A CameraInfo that describes an undistorted image with these intrinsics exactly (K = P[:3,:3])."""
    fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    return CameraInfo(
        header=header,
        width=intrinsics.width,
        height=intrinsics.height,
        distortion_model="plumb_bob",
        d=[0.0] * 5,
        k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0],
        r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0],
    )


# -- point clouds -------------------------------------------------------------------------------

def cloud_to_msg(cloud: np.ndarray, header: Header, buffer: MessageBuffer | None = None) -> PointCloud2:
    """An organized structured array (from :func:`organized_cloud`) as ``sensor_msgs/PointCloud2``.

    A cloud built in ``buffer`` (``organized_cloud(..., out=buffer.array(...))``) is wrapped without
    a copy; any other is copied once.
    """
    names, by_name = cloud.dtype.names, cloud.dtype.fields
    assert names is not None and by_name is not None, "cloud_to_msg: a structured array (organized_cloud)"
    fields = [
        PointField(name=name, offset=int(by_name[name][1]), datatype=PointField.FLOAT32, count=1)
        for name in names
    ]
    rows, cols = cloud.shape
    raw = np.ascontiguousarray(cloud).view(np.uint8).reshape(rows, cols * cloud.dtype.itemsize)
    return PointCloud2(
        check_fields=True, header=header, height=rows, width=cols, fields=fields, is_bigendian=not np.little_endian,
        point_step=cloud.dtype.itemsize, row_step=cloud.dtype.itemsize * cols,
        data=_byte_data(raw, buffer), is_dense=False,
    )


def msg_to_cloud(msg: PointCloud2) -> np.ndarray:
    """A PointCloud2 with float32 fields as a (height, width) structured array (zero-copy view)."""
    if any(f.datatype != PointField.FLOAT32 or f.count != 1 for f in msg.fields):
        raise InputError("point cloud: only float32 scalar fields are supported")
    dtype = np.dtype({"names": [f.name for f in msg.fields], "formats": [np.float32] * len(msg.fields),
                      "offsets": [f.offset for f in msg.fields], "itemsize": msg.point_step})
    if msg.row_step != msg.point_step * msg.width or len(msg.data) != msg.row_step * msg.height:
        raise InputError("point cloud: row_step / data length do not match width x point_step")
    return np.frombuffer(msg.data, dtype=dtype).reshape(msg.height, msg.width)


def points_to_msgs(points: np.ndarray | Sequence[Sequence[float]]) -> list[Point]:
    """(N, 3) metres as ``geometry_msgs/Point`` (NaN kept)."""
    return [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in np.asarray(points, dtype=np.float64)]
