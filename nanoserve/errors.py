"""Every error nanoserve raises on purpose, in one place.

Each message says what was wrong and what to do. Errors caused by a request
(``RequestError`` and subclasses) are reported to that request only; the engine keeps
serving everything else.
"""


class NanoserveError(Exception):
    """Base class of all nanoserve errors."""


class ModelLoadError(NanoserveError):
    """A model file or directory is missing, unreadable or corrupt."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture, tensor type or tokenizer is one nanoserve cannot run."""


class BackendError(NanoserveError):
    """A kernel backend cannot be found, imported or used."""


class ConfigError(NanoserveError, ValueError):
    """An engine setting is out of range or cannot work on this machine; says which and why."""


class ComponentError(NanoserveError):
    """An engine part (block allocator, KV manager, scheduler, sampler) cannot be found,
    built, or does not implement its interface."""


class RequestError(NanoserveError, ValueError):
    """A request is invalid; only that request fails."""


class InvalidSamplingParams(RequestError):
    """A sampling parameter is out of range or of the wrong type."""


class PromptTooLongError(RequestError):
    """The prompt (plus at least one new token) does not fit the model's context."""


class ContextLengthExceededError(RequestError):
    """The prompt plus ``max_tokens`` is longer than the model's context."""


class CapacityError(RequestError):
    """The request can never fit in the KV-cache pool, however long it waits."""


class EngineOverloadedError(NanoserveError):
    """The engine's waiting queue is full; try again later."""
