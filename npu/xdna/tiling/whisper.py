"""Whisper tiny.en's shapes: every GEMM and row operation the NPU runs, as designs to build."""

from __future__ import annotations

from .gemm import choose_gemm_tiling
from .mel import choose_mel_tiling
from .rows import choose_row_tiling

D_MODEL, D_FF, N_HEADS, N_VOCAB, N_AUDIO_CTX = 384, 1536, 6, 51864, 1500


def whisper_tiny_gemm_shapes(frames: int = N_AUDIO_CTX, decode_rows: int = 5) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of every weight GEMM of tiny.en: the encoder over ``frames`` positions
    (the conv stem as im2col GEMMs: conv1 runs at 2x the rate), the decoder for a step of
    ``decode_rows`` rows, and the vocabulary projection."""
    f = frames
    r = decode_rows
    return [
        ("enc_conv1", 2 * f, 80 * 3, D_MODEL),
        ("enc_conv2", f, D_MODEL * 3, D_MODEL),
        ("enc_qkv", f, D_MODEL, 3 * D_MODEL),
        ("enc_attn_out", f, D_MODEL, D_MODEL),
        ("enc_fc1", f, D_MODEL, D_FF),
        ("enc_fc2", f, D_FF, D_MODEL),
        ("cross_kv", f, D_MODEL, 2 * D_MODEL),
        ("dec_qkv", r, D_MODEL, 3 * D_MODEL),
        ("dec_proj", r, D_MODEL, D_MODEL),
        ("dec_fc1", r, D_MODEL, D_FF),
        ("dec_fc2", r, D_FF, D_MODEL),
        ("dec_vocab", r, D_MODEL, N_VOCAB),
    ]


def whisper_tiny_row_shapes(frames: int = N_AUDIO_CTX) -> list[tuple[str, str, int, int, dict]]:
    """(name, op, M, N, options) of the encoder's row operations."""
    f = frames
    return [
        ("enc_layernorm", "layernorm", f, D_MODEL, {}),
        ("enc_softmax", "softmax", N_HEADS * f, f, {"masked": True}),
        ("enc_gelu", "gelu", f, D_FF, {}),
        ("enc_quantize_d", "quantize", f, D_MODEL, {}),
        ("enc_quantize_ff", "quantize", f, D_FF, {}),
        ("enc_dequant_d", "dequant", f, D_MODEL, {"residual": True}),
        ("enc_dequant_qkv", "dequant", f, 3 * D_MODEL, {}),
        ("enc_dequant_ff", "dequant", f, D_FF, {}),
        ("enc_requant_d", "requant", f, D_MODEL, {}),
    ]


def whisper_tiny_designs(frames: int = N_AUDIO_CTX, decode_rows: int = 5, mel_frames: int = 2 * N_AUDIO_CTX) -> list:
    """(name, design file stem, tiling) of every artifact the xdna backend can use."""
    out: list = []
    seen: set = set()
    for _name, M, K, N in whisper_tiny_gemm_shapes(frames, decode_rows):
        if (M, K, N) in seen:
            continue
        seen.add((M, K, N))
        out.append((f"gemm_{M}x{K}x{N}", "gemm", choose_gemm_tiling(M, K, N)))
    for _name, op, M, N, opts in whisper_tiny_row_shapes(frames):
        design = {"requant": "requant", "quantize": "requant", "dequant": "requant"}.get(op, op)
        suffix = "".join(f"_{k}" for k, v in sorted(opts.items()) if v)
        out.append((f"{op}_{M}x{N}{suffix}", design, choose_row_tiling(op, M, N, **opts)))
    out.append((f"mel_{mel_frames}", "mel", choose_mel_tiling(mel_frames)))
    return out
