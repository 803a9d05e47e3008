"""Exceptions of the data layer; all are ``ValueError`` subclasses."""


class DataError(ValueError):
    """Base class of every data-layer error."""


class DataRootError(DataError):
    """The data root is missing, malformed or cannot be prepared."""


class DatasetFormatError(DataError):
    """A prepared dataset is not in the format this version reads."""


class ImageReadError(DataError):
    """An image file cannot be opened or decoded."""


class ChannelMismatchError(DataError):
    """An image's channel count cannot be converted to the dataset's."""


class SplitError(DataError):
    """Unknown split, or a class that no split lists."""


class EpisodeConfigError(DataError):
    """Invalid ways / shots / query for an episode sampler."""


class NotEnoughClassesError(EpisodeConfigError):
    """A split has fewer classes than the requested ways."""


class NotEnoughImagesError(EpisodeConfigError):
    """A class has fewer images than shots + query."""
