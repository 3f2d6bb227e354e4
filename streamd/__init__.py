"""streamd: a streaming, real-time Whisper transcription daemon."""

__version__ = "0.1.0"
