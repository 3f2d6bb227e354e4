"""How far the quantised NPU model's next-token distribution is from the float32 model's.

A lower-noise measure than WER for choosing precisions: on windows of dev speech, the float32
engine's own greedy transcript is teacher-forced through both models, and at every position
this prints how often their top tokens agree and the mean KL divergence (float32 || quantised).
Rows: the shipped precisions (npu/quant.py), and int8 activations everywhere for comparison.

    python benchmarks/quant_agreement.py
"""

from __future__ import annotations

import time

import numpy as np
from harness import CORPUS

from npu.backends.golden import GoldenBackend
from streamd.audio import load_audio
from whisper_engine.engine import Engine
from whisper_engine.transcribe import TranscribeOptions, transcribe

SOT = [50257, 50362]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    engine = Engine.load(backend="cpu")
    cpu = engine.backend
    windows = []
    for wav in sorted(CORPUS.glob("*.wav"))[::3]:
        audio = load_audio(wav)[: 25 * 16000]
        mel = cpu.log_mel(audio)
        mel = mel[:, : mel.shape[1] // 2 * 2]
        text = transcribe(engine, audio, TranscribeOptions(word_timestamps=False)).text
        tokens = np.array([SOT + engine.tokenizer.encode(" " + text.strip())[:120]])
        reference = cpu.decoder(cpu.encode(mel)).step(tokens, positions=range(tokens.shape[1]))[0]
        windows.append((mel, tokens, _log_softmax(reference)))

    def score(backend: GoldenBackend) -> tuple[float, float]:
        agree = total = 0
        kls = []
        for mel, tokens, ref in windows:
            got = backend.decoder(backend.encode(mel)).step(tokens, positions=range(tokens.shape[1]))[0]
            got = _log_softmax(got)
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ref)
            kls.append(float((np.exp(ref) * (ref - got)).sum(-1).mean()))
        return agree / total, float(np.mean(kls))

    shipped = GoldenBackend(engine.weights)
    int8 = GoldenBackend(engine.weights)
    for linear in _linears(int8):
        linear.activation_bits = 8
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(windows)} windows, teacher-forced")
    print("| activations | top-1 agreement | mean KL (float32 || quantised) |")
    print("|---|---:|---:|")
    for name, backend in (("shipped (int16 where inner size <= 511)", shipped), ("int8 everywhere", int8)):
        agreement, kl = score(backend)
        print(f"| {name} | {agreement:.2%} | {kl:.4f} |")


def _linears(backend: GoldenBackend) -> list:
    enc, dec = backend.model.encoder, backend.model.decoder
    out = [*enc.conv1, *enc.conv2, dec.embedding]
    for layer in [*enc.layers, *dec.layers]:
        out.extend(v for v in layer.values() if hasattr(v, "activation_bits"))
    return out


if __name__ == "__main__":
    main()
