"""Few-shot scoring speed: ms per image for bank search + image score + anomaly map.

    python bench/score.py [--threads 2] [--image-size 900] [--shots 1,16] [--repeats 20]

Geometries: dinov2_vits14 at 448 (32x32 patches x 384) and efficientnet_lite0 at 448
(28x28 x 152). 'agnostic' banks hold 8 rotations per reference. Features are random (search
time does not depend on the values); the map is built at the original image size.
Compare with bench/embed.py: the target is scoring <= 30% of the embedding time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from anomalydino_core.few_shot import FewShotScorer

GEOMETRIES = {"dinov2_vits14": (32, 32, 384), "efficientnet_lite0": (28, 28, 152)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=900)
    p.add_argument("--shots", default="1,16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--index", default="exact,exact_bf16", help="bank index kinds to compare")
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    size = (args.image_size, args.image_size)
    print(f"threads={args.threads} map size={size}")
    print(
        f"{'geometry':<20}{'index':<12}{'shots':>6}{'bank':>9}{'search ms':>11}"
        f"{'score+map ms':>14}{'total ms':>10}"
    )
    for name, (gh, gw, dim) in GEOMETRIES.items():
        for kind in args.index.split(","):
            for shots in (int(s) for s in args.shots.split(",")):
                bank = rng.standard_normal((shots * 8, gh, gw, dim), dtype=np.float32)
                scorer = FewShotScorer(index_kind=kind).fit(list(bank))
                queries = [rng.standard_normal((gh, gw, dim), dtype=np.float32) for _ in range(4)]
                scorer.score(queries[0], image_size=size)
                search, total = [], []
                for i in range(args.repeats):
                    q = queries[i % 4]
                    t0 = time.perf_counter()
                    scorer.index.nearest_distance(q.reshape(-1, dim))
                    t1 = time.perf_counter()
                    scorer.score(q, image_size=size)
                    t2 = time.perf_counter()
                    search.append(t1 - t0)
                    total.append(t2 - t1)
                s_ms = 1000 * statistics.median(search)  # search alone
                t_ms = 1000 * statistics.median(total)  # search + image score + map
                print(
                    f"{name:<20}{kind:<12}{shots:>6}{scorer.bank_size:>9}{s_ms:>11.1f}{t_ms - s_ms:>14.1f}"
                    f"{t_ms:>10.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
