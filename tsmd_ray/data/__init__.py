"""Data layer: Arrow storage, dataset preparation, episode sampling, transforms (no training code)."""

from .arrow import FORMAT_VERSION, ArrowFewShotDataset, read_meta
from .arrow_write import write_dataset
from .episodes import Episode, EpisodeSampler
from .errors import (
    ChannelMismatchError,
    DataError,
    DataRootError,
    DatasetFormatError,
    EpisodeConfigError,
    ImageReadError,
    NotEnoughClassesError,
    NotEnoughImagesError,
    SplitError,
)
from .folder import PrepareOptions, prepare_folder, prepare_manifest
from .omniglot import prepare_omniglot
from .registry import PREPARERS, Preparer, resolve_dataset
from .transforms import augment, augmented_views, load_image, normalise

__all__ = [
    "FORMAT_VERSION",
    "PREPARERS",
    "ArrowFewShotDataset",
    "ChannelMismatchError",
    "DataError",
    "DataRootError",
    "DatasetFormatError",
    "Episode",
    "EpisodeConfigError",
    "EpisodeSampler",
    "ImageReadError",
    "NotEnoughClassesError",
    "NotEnoughImagesError",
    "PrepareOptions",
    "Preparer",
    "SplitError",
    "augment",
    "augmented_views",
    "load_image",
    "normalise",
    "prepare_folder",
    "prepare_manifest",
    "prepare_omniglot",
    "read_meta",
    "resolve_dataset",
    "write_dataset",
]
