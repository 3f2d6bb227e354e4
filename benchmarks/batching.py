"""Does batching work across streams pay on the CPU backend? Times the model's hot products
with the rows of several streams in one call against one call per stream.

    python benchmarks/batching.py [--threads 1]

Decoder steps are bound by reading weights (80 MB of vocabulary projection, ~26 MB of layers),
so in principle N streams' rows could share one read. Whether they do depends on the BLAS:
OpenBLAS takes a multi-row product down its GEMM path, which packs the whole matrix first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from whisper_engine.engine import Engine


def best_ms(f, repeat: int = 30) -> float:
    f()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (the daemon's default is 1)")
    args = p.parse_args()
    engine = Engine.load()
    dec, enc = engine.backend.decoder_model, engine.backend.encoder
    rng = np.random.default_rng(0)
    fc1_w = dec.layers[0]["fc1"][0]  # [1536, 384]: the largest decoder layer product
    rows = []
    with threadpool_limits(args.threads):
        for n in (1, 2, 4):
            x = rng.standard_normal((n, 384)).astype(np.float32)
            together = best_ms(lambda x=x: x @ dec.embedding_t)
            apart = best_ms(lambda x=x, n=n: [x[i : i + 1] @ dec.embedding_t for i in range(n)])
            rows.append(("vocabulary projection 384 x 51864", n, together, apart))
        for n in (1, 2, 4):
            x = rng.standard_normal((n, 384)).astype(np.float32)
            together = best_ms(lambda x=x: x @ fc1_w.T)
            apart = best_ms(lambda x=x, n=n: [x[i : i + 1] @ fc1_w.T for i in range(n)])
            rows.append(("decoder fc1 384 x 1536", n, together, apart))
        enc_fc1 = enc.layers[0]["fc1"][0]
        for n in (1, 2):
            # Encoder linears: a 10 s window is 500 rows; n windows batched are n x 500 rows
            # (attention stays per window, so only the linears could gain).
            x = rng.standard_normal((n * 500, 384)).astype(np.float32)
            together = best_ms(lambda x=x: x @ enc_fc1.T, repeat=10)
            apart = best_ms(lambda x=x, n=n: [x[i * 500 : (i + 1) * 500] @ enc_fc1.T for i in range(n)], repeat=10)
            rows.append(("encoder fc1, 10 s windows (500 x 384 x 1536 each)", n, together, apart))
    print(f"BLAS threads: {args.threads}; best of repeated runs")
    print("| product | streams | one call ms | one call per stream ms | batched / separate |")
    print("|---|---:|---:|---:|---:|")
    for name, n, together, apart in rows:
        print(f"| {name} | {n} | {together:.2f} | {apart:.2f} | {together / apart:.2f} |")


if __name__ == "__main__":
    main()
