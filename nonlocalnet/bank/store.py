"""A feature bank on disk: per video, the pooled features of its clips, in one safetensors file.

Layout of the file:
    tensors   "features/<video id>"  (L, C) float32, the features of the video's L clips in time order
              "starts/<video id>"    (L,) int64, the first frame of each clip
    metadata  "format" = "nonlocalnet.feature_bank/1", "channels", and whatever the builder recorded
              (model name, clip length, frame stride, step), all strings as safetensors requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..io import atomic_path

__all__ = ["FeatureBank", "FORMAT"]

FORMAT = "nonlocalnet.feature_bank/1"


@dataclass
class FeatureBank:
    """Features of every clip of every video, keyed by video id.

    Attributes:
        features: video id -> (L, C) features of its L clips, in time order.
        starts: video id -> (L,) first frame of each clip.
        metadata: string -> string facts about how the bank was built.
    """

    features: dict[str, Tensor] = field(default_factory=dict)
    starts: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError if the videos' features and starts disagree or channels differ."""
        if set(self.features) != set(self.starts):
            raise ValueError("features and starts must have the same video ids")
        channels = {f.shape[1] for f in self.features.values() if f.dim() == 2}
        for vid, f in self.features.items():
            if f.dim() != 2 or f.shape[0] != self.starts[vid].shape[0]:
                raise ValueError(
                    f"video {vid!r}: features must be (L, C) with L = len(starts); got "
                    f"{tuple(f.shape)} and {tuple(self.starts[vid].shape)} starts"
                )
        if len(channels) > 1:
            raise ValueError(f"every video's features need the same channels; found {sorted(channels)}")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def channels(self) -> int:
        """C, channels of every feature."""
        if not self.features:
            raise ValueError("the feature bank is empty")
        return next(iter(self.features.values())).shape[1]

    def bank(self, video: str) -> Tensor:
        """The bank of one video as the feature-bank operator takes it: (C, L)."""
        if video not in self.features:
            raise KeyError(f"video {video!r} is not in the feature bank ({len(self)} videos)")
        return self.features[video].t()  # (L, C) -> (C, L)

    def save(self, path: str | Path) -> Path:
        """Writes the bank to ``path`` (safetensors), atomically: a temporary file, then a rename."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for vid in self.features:
            tensors[f"features/{vid}"] = self.features[vid].detach().float().cpu().contiguous()
            tensors[f"starts/{vid}"] = self.starts[vid].detach().long().cpu().contiguous()
        metadata = dict(self.metadata, format=FORMAT)
        if self.features:
            metadata["channels"] = str(self.channels)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureBank:
        """Reads a bank written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not a nonlocalnet feature bank or is inconsistent.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no feature bank at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a nonlocalnet feature bank (format {metadata.get('format')!r}, expected {FORMAT!r})"
            )
        features, starts = {}, {}
        for key, value in tensors.items():
            kind, _, vid = key.partition("/")
            if kind == "features":
                features[vid] = value
            elif kind == "starts":
                starts[vid] = value
            else:
                raise ValueError(f"{path}: unexpected tensor {key!r} in a feature bank")
        return cls(features, starts, metadata)
