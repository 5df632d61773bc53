"""The package's exceptions, split by whose fault they are.

`InvalidRequestError` and its subclasses are the caller's fault (bad input, unreadable media,
a prompt beyond the context, settings the model refuses): the server answers them with a 4xx
and the CLI with one line. Anything else that escapes is a bug or an environment fault: the
server logs it and answers 500. None of these subclass ValueError, so a ValueError from numpy
or from our own code is never taken for the client's mistake.
"""


class SmolVLMError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidRequestError(SmolVLMError):
    """The input is at fault: a parameter out of range, a prompt that does not fit, a
    request the model cannot take."""


class MediaError(InvalidRequestError):
    """An image or video that cannot be read, or that the model cannot take."""


class ImageError(MediaError):
    """An image that cannot be fetched or decoded."""


class VideoError(MediaError):
    """A video that cannot be opened or decoded."""


class CheckpointError(SmolVLMError):
    """A model folder or file that cannot be loaded as it is."""


class ConfigError(CheckpointError):
    """A config.json this package refuses (missing or inconsistent fields)."""


class LayoutError(CheckpointError):
    """Weight keys in no layout this package knows."""


class ProcessorConfigError(CheckpointError):
    """Processor settings that cannot be read."""


class TokenizerError(CheckpointError):
    """A tokenizer that cannot be built from the folder's files."""


class ConvertError(SmolVLMError):
    """A conversion refused or failed (bad options, an existing output, an upload error)."""
