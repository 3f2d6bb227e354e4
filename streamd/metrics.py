"""Prometheus metrics for ``GET /metrics``: one registry per daemon (tests run several)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from whisper_engine.guard import GUARD_RULES

from .stream import Job
from .vad import detector_cpu_seconds

if TYPE_CHECKING:
    from .files import FileQueue
    from .status import Status

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0)
JOB_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, status: Status) -> None:
        r = self.registry = CollectorRegistry()
        hub, scheduler = status.hub, status.scheduler
        Gauge("streamd_streams", "Live audio sources", registry=r).set_function(lambda: len(hub.sources))
        Gauge("streamd_viewers", "Connected captions viewers", registry=r).set_function(lambda: hub.viewer_count)
        Gauge("streamd_streams_waiting", "Streams with audio waiting for the engine", registry=r).set_function(
            lambda: scheduler.waiting
        )
        Gauge("streamd_lag_seconds", "Largest delay between audio arriving and its decode", registry=r).set_function(
            lambda: max((s.lag for s in hub.sources.values()), default=0.0)
        )
        self.audio_seconds = Counter("streamd_audio_seconds", "Seconds of audio received", ["kind"], registry=r)
        self.final_latency = Histogram(
            "streamd_final_latency_seconds",
            "From the arrival of a final's last audio to the final being sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.job_seconds = Histogram(
            "streamd_decode_seconds",
            "Compute time of one window decode (mel, encoder, decoder, alignment)",
            ["device", "final"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        Gauge("streamd_client_queue_max", "Most messages waiting for any one client", registry=r).set_function(
            lambda: max((len(o) for o in hub.outboxes()), default=0)
        )
        Gauge("streamd_client_queue_messages", "Messages waiting for all clients", registry=r).set_function(
            lambda: sum(len(o) for o in hub.outboxes())
        )
        self.batch_size = Histogram(
            "streamd_batch_size",
            "Jobs (streams' windows) per engine run: 1 unless the backend batches (cuda)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        Gauge("streamd_max_batch", "Most jobs one engine run takes (1: no batching)", registry=r).set_function(
            lambda: scheduler.max_batch
        )
        self.vad_rejected = Counter(
            "streamd_vad_rejected_regions",
            "Sounds webrtcvad took for speech that the speech detector did not (music, animals, noise)",
            registry=r,
        )
        r.register(_StageCollector(status))
        r.register(_KindCollector(hub))
        r.register(_DetectorCollector())
        r.register(_GuardCollector(status))
        r.register(_DeviceMemoryCollector(status))
        self.errors = Counter("streamd_client_errors", "Protocol errors sent to clients", ["code"], registry=r)
        self.slow_clients = Counter("streamd_slow_clients", "Clients cut off for not reading", registry=r)
        self._status = status

    def watch_files(self, files: FileQueue) -> None:
        """The file API's queue: requests taken, refused and failed, audio and busy seconds."""
        self.registry.register(_FilesCollector(files))

    def observe_job(self, job: Job, seconds: float) -> None:
        device = self._status.devices.get("encoder", "cpu")
        self.job_seconds.labels(device, "true" if job.final else "false").observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StageCollector:
    """Compute seconds per stage, labelled with the device that really ran it."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self):
        engine, stats = self._status.engine, self._status.scheduler.stats
        devices = self._status.devices
        family = CounterMetricFamily(
            "streamd_stage_seconds",
            "Compute time per pipeline stage and the device that ran it",
            labels=["stage", "device"],
        )
        seconds = dict(engine.stage_seconds)
        seconds["mel"] = seconds.get("mel", 0.0) + stats.mel_s + stats.window_mel_s  # the mel thread's share
        for stage, value in seconds.items():
            family.add_metric([stage, devices.get(stage, "cpu")], value)
        yield family


class _KindCollector:
    """Live streams by the protocol (or source) they came in on: websocket (v1), realtime,
    deepgram, wyoming, tcp, file, mic."""

    def __init__(self, hub) -> None:
        self._hub = hub

    def collect(self):
        family = GaugeMetricFamily("streamd_streams_by_kind", "Live audio sources by protocol", labels=["kind"])
        counts: dict[str, int] = {}
        for source in self._hub.sources.values():
            counts[source.kind] = counts.get(source.kind, 0) + 1
        for kind, n in sorted(counts.items()):
            family.add_metric([kind], n)
        yield family


class _DetectorCollector:
    """The neural speech detector's own cost: CPU seconds, and the audio seconds it judged (it
    sleeps while webrtcvad hears nothing)."""

    def collect(self):
        spent, judged = detector_cpu_seconds()
        yield CounterMetricFamily(
            "streamd_speech_detector_seconds", "CPU time of the neural speech detector (Silero)", value=spent
        )
        yield CounterMetricFamily(
            "streamd_speech_detector_audio_seconds", "Audio the neural speech detector judged", value=judged
        )


class _GuardCollector:
    """Streamed windows the window guard dropped (the decoder itself rated them no speech), per rule."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self):
        family = CounterMetricFamily(
            "streamd_guard_dropped_windows",
            "Decoded windows dropped because the model rated them no speech, per rule",
            labels=["rule"],
        )
        dropped = dict(self._status.engine.guard_dropped)
        for rule in GUARD_RULES:
            family.add_metric([rule], dropped.get(rule, 0))
        yield family


class _FilesCollector:
    """``/v1/audio/transcriptions`` as its queue counts it."""

    def __init__(self, files: FileQueue) -> None:
        self._files = files

    def collect(self):
        stats = self._files.stats
        pending = GaugeMetricFamily("streamd_file_requests_pending", "File transcriptions waiting or running")
        pending.add_metric([], self._files.pending)
        yield pending
        for name, text, value in (
            ("streamd_file_requests", "File transcriptions taken", stats.requests),
            ("streamd_file_requests_refused", "File transcriptions turned away with 429 (queue full)", stats.refused),
            ("streamd_file_requests_failed", "File transcriptions that failed in the engine", stats.failures),
            ("streamd_file_audio_seconds", "Seconds of audio in transcribed files", stats.audio_s),
            ("streamd_file_busy_seconds", "Wall time spent transcribing files", stats.busy_s),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family


class _DeviceMemoryCollector:
    """Device memory as the backend reports it (nothing for backends that keep no device state):
    ``streamd_decode_state_bytes_per_stream`` (what one more stream in a batch reserves: its KV
    cache, cross-attention K/V and outputs) and ``streamd_device_memory_bytes{kind}``."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self):
        report = self._status.device_memory()
        if report is None:
            return
        per_stream = report.get("decode_state_bytes_per_stream")
        if per_stream is not None:
            yield GaugeMetricFamily(
                "streamd_decode_state_bytes_per_stream",
                "Device memory the batched decoder reserves per stream in a batch",
                value=per_stream,
            )
        family = GaugeMetricFamily(
            "streamd_device_memory_bytes",
            "Device memory: decode_state (the batched decoder's static buffers), allocated, reserved "
            "and peak_allocated (torch's CUDA allocator, on a GPU)",
            labels=["kind"],
        )
        for key, value in report.items():
            if key.endswith("_bytes") and key != "decode_state_bytes_per_stream":
                family.add_metric([key.removesuffix("_bytes")], value)
        yield family
        if "decode_state_rows" in report:
            yield GaugeMetricFamily(
                "streamd_decode_state_rows",
                "Streams the batched decoder's state holds room for",
                value=report["decode_state_rows"],
            )
