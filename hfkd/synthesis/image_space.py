"""Where synthesised images live: a model's normalised input space, and the way back to stored pixels.

Both data-free methods optimise or generate `pixel_values`, the tensor an image classifier reads after its image
processor has rescaled and normalised an image:

    x = (p * rescale_factor - mean_c) / std_c,        p in [0, 255] a pixel of channel c

so a stored image is p = (x * std_c + mean_c) / rescale_factor, clipped to [0, 255] and rounded. `ImageSpace` holds
the shape and those constants, taken from the teacher's image processor (or given), and converts both ways. Storing
images rather than tensors is what lets any recipe read the result: a recipe's image rows pass through the teacher's
processor again (hfkd.data.preprocess_image_classification), which maps p back to x up to the rounding to whole
pixels (at most 0.5 / 255 / std_c).
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSpace:
    """The shape of a model's `pixel_values` and the normalisation between them and 0-255 pixels.

    Attributes:
        channels: 1 (grey, stored as mode "L" images) or 3 (RGB).
        height, width: the model's input size in pixels.
        mean, std: per channel, the processor's `image_mean` / `image_std` (0 and 1 when it does not normalise).
        rescale_factor: the processor's `rescale_factor` (1/255), or 1 when it does not rescale.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB) to store images, got {self.channels}.")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {self.height} x {self.width}.")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise ValueError(
                    f"The image processor's image_{name} has {len(values)} values for a model of {self.channels} "
                    f"channel(s); give one per channel (image_processor_kwargs)."
                )
            object.__setattr__(self, name, values)
        if min(self.std) <= 0 or self.rescale_factor <= 0:
            raise ValueError(f"image_std and rescale_factor must be > 0, got {self.std} and {self.rescale_factor}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def _constants(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel range of `pixel_values` that pixels 0..255 map to, shaped [1, C, 1, 1] like `like`."""
        mean, std = self._constants(like)
        return (0.0 - mean) / std, (255.0 * self.rescale_factor - mean) / std

    def clip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` clipped to what a stored image can hold."""
        low, high = self.bounds(pixel_values)
        return torch.maximum(torch.minimum(pixel_values, high), low)

    def to_uint8(self, pixel_values: torch.Tensor) -> np.ndarray:
        """[N, C, H, W] model inputs -> [N, H, W, C] uint8 pixels (clipped and rounded)."""
        x = pixel_values.detach().to("cpu", torch.float64)
        mean, std = self._constants(x)
        pixels = ((x * std + mean) / self.rescale_factor).clamp(0, 255).round()
        return pixels.permute(0, 2, 3, 1).numpy().astype(np.uint8)

    def from_uint8(self, pixels: np.ndarray) -> torch.Tensor:
        """[N, H, W, C] uint8 pixels -> [N, C, H, W] float32 model inputs (what the processor computes)."""
        x = torch.from_numpy(np.asarray(pixels, dtype=np.float64)).permute(0, 3, 1, 2)
        mean, std = self._constants(x)
        return ((x * self.rescale_factor - mean) / std).float()

    def to_images(self, pixel_values: torch.Tensor) -> list:
        """[N, C, H, W] model inputs -> PIL images (mode "L" for 1 channel, "RGB" for 3)."""
        from PIL import Image

        pixels = self.to_uint8(pixel_values)
        if self.channels == 1:
            return [Image.fromarray(p[:, :, 0], mode="L") for p in pixels]
        return [Image.fromarray(p, mode="RGB") for p in pixels]

    def describe(self) -> dict:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "rescale_factor": self.rescale_factor,
        }

    @classmethod
    def from_record(cls, record: dict) -> "ImageSpace":
        """The space `describe()` wrote (hfkd_synthesis.json's `image_space`)."""
        return cls(
            record["channels"],
            record["height"],
            record["width"],
            tuple(record["image_mean"]),
            tuple(record["image_std"]),
            record["rescale_factor"],
        )

    @classmethod
    def from_processor(cls, processor, model_config=None, image_size: int | None = None) -> "ImageSpace":
        """The space of a model read through `processor` (a transformers image processor, or None).

        Channels come from the model's config (`num_channels`); the size from `image_size` when given, else the
        processor's output size (its crop size when it crops), else the config's `image_size`."""
        channels = getattr(model_config, "num_channels", None) or 3
        height = width = None
        if image_size is not None:
            height = width = int(image_size)
        elif processor is not None:
            height, width = _processor_size(processor)
        if height is None and getattr(model_config, "image_size", None):
            size = model_config.image_size
            height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height is None:
            raise ValueError(
                "The input size of the teacher is unknown: its config has no image_size and no image processor "
                "gives one. Set image_size (e.g. --image_size 28), or give image_processor_kwargs with a size."
            )
        if processor is None:
            return cls(channels, height, width)
        normalise = getattr(processor, "do_normalize", True)
        rescale = getattr(processor, "do_rescale", True)
        mean = processor.image_mean if normalise else (0.0,)
        std = processor.image_std if normalise else (1.0,)
        factor = getattr(processor, "rescale_factor", 1 / 255) if rescale else 1.0
        mean = (mean,) if isinstance(mean, (int, float)) else tuple(mean)
        std = (std,) if isinstance(std, (int, float)) else tuple(std)
        return cls(channels, height, width, mean, std, factor)


def _processor_size(processor) -> tuple[int | None, int | None]:
    """The height and width a processor's output has (its crop when it crops), or (None, None)."""
    for name, active in (("crop_size", "do_center_crop"), ("size", "do_resize")):
        size = getattr(processor, name, None)
        if size is None or not getattr(processor, active, name == "size"):
            continue
        size = {"height": size, "width": size} if isinstance(size, int) else dict(size)
        size = {key: value for key, value in size.items() if value is not None}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            # ConvNext-style processors resize the shortest edge and crop a square of that side.
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None, None
