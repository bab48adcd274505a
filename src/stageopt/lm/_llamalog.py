"""llama.cpp's own log lines, sent to Python logging instead of stderr."""

from __future__ import annotations

import logging
from typing import Any

_LLAMA_LOG_CALLBACK: Any = None


def route_llama_logs() -> None:
    """Send llama.cpp's own messages to the ``stageopt.llama_cpp`` logger at DEBUG level.

    llama-cpp-python maps ggml log levels with an outdated table, so warnings such as
    "using full-size SWA cache" reach stderr even with ``verbose=False``; failures surface as
    Python exceptions anyway.
    """
    global _LLAMA_LOG_CALLBACK
    if _LLAMA_LOG_CALLBACK is not None:
        return
    import ctypes

    import llama_cpp

    llama_logger = logging.getLogger("stageopt.llama_cpp")

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        llama_logger.debug("%s", text.decode("utf-8", errors="replace").rstrip())

    _LLAMA_LOG_CALLBACK = callback  # ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
