"""How an image file becomes the tensor a network sees: one object, stored in every checkpoint.

The loaders decode their files with ``ImageTransform.decode`` into the uint8 images they keep in
memory, and the sampler turns those into network input with ``ImageTransform.to_tensor``;
prediction on a user's files calls the same two methods, from the copy stored in the checkpoint.
So a file gives the same tensor whether it came through a data set or through ``predict``.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import frame_fraction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GREY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L"}
_MODE_NAMES = {"RGBA": "RGBA: colour with alpha", "LA": "LA: grey with alpha", "P": "P: palette",
               "PA": "PA: palette with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "RGB": "RGB", "L": "L: grey"}


def _eight_bit(img: Image.Image) -> Image.Image:
    """``img`` with 8-bit channels, converted by value range rather than clipped: 16-bit grey is
    divided by 257, 32-bit integers likewise when they exceed 255, floats in [0, 1] scaled by 255
    (others clipped to [0, 255]); transparent pixels are laid on white (drawings on a transparent
    background read as drawings on paper), and the result is grey when its colours are; palette
    images become their colours."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif img.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        white = Image.new(img.mode, img.size, (255,) * len(img.mode))
        flat = Image.alpha_composite(white.convert("RGBA"), img.convert("RGBA")).convert("RGB")
        array = np.asarray(flat)
        grey = img.mode == "LA" or ((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())
        return flat.convert("L") if grey else flat   # grey strokes with alpha are a grey image
    return img


def _channels_of(img: Image.Image) -> int:
    """1 for a grey image, 3 for colour; a WebP file (a format with no grey mode, so Pillow decodes
    a grey one as RGB) whose three channels are equal everywhere counts as grey."""
    if img.mode in _GREY_MODES:
        return 1
    if img.mode == "RGB" and getattr(img, "format", None) == "WEBP":
        array = np.asarray(img)
        if (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
            return 1
    return 3


def _majority_3x3(mask: np.ndarray) -> np.ndarray:
    """A 3 x 3 median filter of a boolean image (edges repeated): the pixels of which at least five
    of their nine are set. For ink on one side of the paper's level this is the same as median
    filtering the grey image and then thresholding it, at a tenth of the cost."""
    padded = np.pad(mask, 1, mode="edge").astype(np.uint8)
    height, width = mask.shape
    count = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
    return count >= 5


INK_THRESHOLD = 64   # grey levels from the paper's at which a pixel counts as ink, for framing


def _framed(img: Image.Image, fill: float, size: int, resample: int = Image.Resampling.LANCZOS,
            threshold: int = INK_THRESHOLD) -> Optional[Image.Image]:
    """``img`` (grey or RGB) as a ``size`` x ``size`` image of its ink, centred, the ink's longer
    side ``fill`` of the side, on its own paper. The paper is the image's median (a drawing is
    mostly paper, whichever its polarity); ink is every pixel more than ``threshold`` grey levels
    from it after a 3 x 3 median filter, so that specks of dust or noise do not stretch the box
    (all of them, where the filter leaves none: a drawing of hairlines). The crop box is kept to
    the sub-pixel and resampled in one step, so a drawing and a smaller copy of it give nearly
    the same image; a page many times the output's size is first reduced by box averaging, so
    memory stays bounded whatever the page and ``fill``. None for an image with no ink."""
    grey = np.asarray(img.convert("L"), dtype=np.int16)
    paper_level = int(np.median(grey))
    off_paper = np.abs(grey - paper_level) > threshold
    ink = _majority_3x3(off_paper)
    if not ink.any():   # strokes thinner than the filter: take every pixel off the paper
        ink = off_paper
    if not ink.any():
        return None
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    side, centre_x, centre_y = max(bottom - top, right - left) / fill, (left + right) / 2, (top + bottom) / 2
    if img.mode == "L":
        paper = paper_level
    else:
        paper = tuple(int(v) for v in np.median(np.asarray(img).reshape(-1, 3), axis=0))
    factor = min(int(side // (2 * size)), max(img.size))
    if factor >= 2:
        img = img.reduce(factor)
        side, centre_x, centre_y = side / factor, centre_x / factor, centre_y / factor
    x0, y0 = centre_x - side / 2, centre_y - side / 2
    origin_x, origin_y = int(np.floor(x0)), int(np.floor(y0))
    extent = int(np.ceil(side)) + 2
    canvas = Image.new(img.mode, (extent, extent), paper)
    canvas.paste(img, (-origin_x, -origin_y))
    box = (x0 - origin_x, y0 - origin_y, x0 - origin_x + side, y0 - origin_y + side)
    return canvas.resize((size, size), resample, box=box)


_RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
               "box": Image.Resampling.BOX}
ImageLike = Union[bytes, str, Path, Image.Image]


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """File -> network input, declared.

    - ``image_size``, ``channels`` (1 grey, 3 RGB): the stored images are ``[channels, size, size]``;
      an image of another size is resized with ``resample`` (a Pillow filter name).
    - ``invert``: store ``255 - pixel`` (Omniglot's files are black strokes on white; its networks
      see bright strokes on a zero background).
    - ``scale``: network input is ``uint8 / scale`` (255: values in [0, 1]); then, if given,
      ``(x - mean) / std`` per channel.
    - ``background``: ``"dark"`` or ``"light"``, the polarity of the training images as the
      network saw them (after inversion), or None where it means nothing (photographs). Prediction
      warns when a support set's polarity disagrees.
    - ``convert_channels``: grey files were converted to ``channels`` (or colour ones to grey)
      when the training set was read, so prediction converts them the same way; otherwise an
      image of another channel count is refused, naming its mode.
    - ``frame``: for drawings, a fraction from 0.1 to 1: each file is cropped to its ink and centred
      on a square canvas of its background, the drawing's longer side ``frame`` of the canvas's,
      before resizing (``_framed``). A drawing then reaches the network at one size and place,
      however large and wherever it was drawn; None reads the whole file as it is.
    """

    image_size: int
    channels: int = 1
    resample: str = "lanczos"
    invert: bool = False
    scale: float = 255.0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    background: Optional[str] = None
    convert_channels: bool = False
    frame: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"ImageTransform: image_size must be a positive integer, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageTransform: channels must be 1 or 3, got {self.channels!r}")
        if self.resample not in _RESAMPLING:
            raise ValueError(f"ImageTransform: resample must be one of {sorted(_RESAMPLING)}, got {self.resample!r}")
        if self.background not in (None, "dark", "light"):
            raise ValueError(f"ImageTransform: background must be 'dark', 'light' or None, got {self.background!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("ImageTransform: give both mean and std, or neither")
        if self.frame is not None:
            object.__setattr__(self, "frame", frame_fraction(self.frame, "ImageTransform: frame"))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != self.channels:
                    raise ValueError(f"ImageTransform: {name} needs {self.channels} value(s), got {value}")
                object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ serialising
    def to_dict(self) -> dict:
        """Plain values only, so a checkpoint holding it loads with ``weights_only=True``."""
        out = dataclasses.asdict(self)
        for name in ("mean", "std"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "ImageTransform":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ImageTransform: unknown field(s) {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> "ImageTransform":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ file -> stored uint8
    def decode(self, image: ImageLike, source: Optional[str] = None, strict_channels: bool = False) -> np.ndarray:
        """One image (bytes, a path or a PIL image) as uint8 ``[channels, size, size]``.

        Errors name ``source`` (or the path). With ``strict_channels`` an image whose own channel
        count (grey 1, colour 3) differs from ``channels`` is an error rather than converted.
        """
        if isinstance(image, (str, Path)):
            source = source or str(image)
            try:
                image = Path(image).read_bytes()
            except OSError as error:
                raise ValueError(f"{source}: cannot read ({error.strerror or error})") from error
        source = source or "image"
        try:
            if isinstance(image, Image.Image):
                return self._decode_pil(image, source, strict_channels)
            with Image.open(io.BytesIO(image)) as opened:
                return self._decode_pil(opened, source, strict_channels)
        except UnidentifiedImageError as error:
            raise ValueError(f"{source}: cannot decode image (not a format Pillow reads, or a damaged file)") from error
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"{source}: cannot decode image ({error})") from error

    def _decode_pil(self, img: Image.Image, source: str, strict_channels: bool) -> np.ndarray:
        mode, img = img.mode, _eight_bit(img)
        native = _channels_of(img) if strict_channels else self.channels
        if native != self.channels:
            raise ValueError(f"{source}: image has {native} channel(s) ({_MODE_NAMES.get(mode, mode)}), "
                             f"expected {self.channels}")
        img = img.convert("L" if self.channels == 1 else "RGB")
        framed = None if self.frame is None else _framed(img, self.frame, self.image_size, _RESAMPLING[self.resample])
        if framed is not None:
            img = framed
        else:
            if self.frame is not None:
                warnings.warn(f"{source}: no drawing found to frame (no pixel is more than {INK_THRESHOLD} grey levels "
                              "from the paper's); the whole image is read", stacklevel=4)
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), _RESAMPLING[self.resample])
        array = np.asarray(img, dtype=np.uint8)
        array = array[None] if self.channels == 1 else array.transpose(2, 0, 1)
        return 255 - array if self.invert else np.ascontiguousarray(array)

    # ------------------------------------------------------------------ stored uint8 -> network input
    def to_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Float network input from stored uint8 images ``[..., C, H, W]``."""
        x = images.float().div_(self.scale)
        if self.mean is not None:
            shape = (-1, 1, 1)
            x = (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)
        return x

    def decode_all(self, images: Sequence[ImageLike], sources: Optional[Sequence[str]] = None,
                   strict_channels: Optional[bool] = None) -> torch.Tensor:
        """Files, bytes or PIL images -> the stored uint8 images ``[N, C, H, W]``; an image of another
        channel count is converted if the training set's were (``convert_channels``), else refused."""
        strict_channels = not self.convert_channels if strict_channels is None else strict_channels
        images = list(images)
        sources = list(sources) if sources is not None else [None] * len(images)
        if not images:
            return torch.zeros(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.from_numpy(np.stack([self.decode(image, source, strict_channels)
                                          for image, source in zip(images, sources)]))

    def load(self, images: Sequence[ImageLike], sources: Optional[Sequence[str]] = None,
             strict_channels: Optional[bool] = None) -> torch.Tensor:
        """Files or PIL images -> network input ``[N, C, H, W]``, as the data set's sampler makes it."""
        return self.to_tensor(self.decode_all(images, sources, strict_channels))


def polarity(images: torch.Tensor, sample: int = 512) -> Optional[str]:
    """``"light"`` when most grey uint8 images are mostly bright (their median pixel is above
    mid-grey), else ``"dark"``; None for colour images or an empty set. Looks at up to ``sample``
    images, evenly spread."""
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[0] == 0:
        return None
    index = torch.linspace(0, images.shape[0] - 1, min(sample, images.shape[0])).long()
    picked = images[index].flatten(1).float()
    light = (picked.median(dim=1).values > 127.5).float().mean().item()
    return "light" if light > 0.5 else "dark"


def image_files(folder: Path) -> Tuple[list, list, list]:
    """The files directly in ``folder`` (sorted, hidden ones left out), split into those whose
    suffix names an image format and the others, and its sub-folders. Sub-folders are not read:
    a class is the images in its own folder, so ``root/alphabet/character/`` does not silently
    merge characters into one class, and a folder linked to ``/`` is not walked."""
    entries = sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    return images, others, [p for p in entries if p.is_dir()]


def sub_folder_notice(sub_folders: list) -> str:
    """The clause that says a folder's sub-folders are not read."""
    names = ", ".join(p.name for p in sub_folders[:3]) + (", ..." if len(sub_folders) > 3 else "")
    return f"its {len(sub_folders)} sub-folder(s) ({names}) are not read"
