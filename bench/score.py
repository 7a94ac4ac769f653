"""Few-shot scoring speed: ms per image for bank search + image score + anomaly map, per method.

    python bench/score.py [--threads 2] [--shots 1,16] [--repeats 9] [--chunk 1]
                          [--cases bottle-vits14,bottle-lite0,tall-lite0,tall-vits14]
                          [--methods faiss,torch,auto] [--index exact] [--rotation agnostic]

Cases (agnostic banks: 8 views per reference for the bottle, 2 for the 500 x 1250 part, whose
aspect keeps only its 0/180 degree views, ``augment.bank_angles``; ``--rotation informed``: 1):

- bottle-vits14: ViT-S/14 at 448, 32 x 32 patches x 384, map at 900 x 900
- bottle-lite0: EfficientNet-Lite0 at 448, 28 x 28 x 152, map at 900 x 900
- tall-lite0: a 500 x 1250 greyscale part, EfficientNet-Lite0 at 448: 28 x 70 x 152
- tall-vits14: the same part with ViT-S/14: 32 x 80 x 384

Features are random unit rows: the fp32 search costs the same whatever the values. Methods:
``faiss`` is the search before the measured choice (faiss's flat index), ``torch`` the blocked
fp32 kernel, ``bf16`` the screen of ``exact_bf16``, ``auto`` what ``PatchIndex`` measures and
picks in this process (printed). All methods of a case run interleaved, repeat by repeat;
medians and [min-max] are printed. ``--chunk 16``: one search for 16 images, as the audit's
scoring task does (``evaluate`` searches one image at a time: ``--chunk 1``).

The last lines state the 16-shot / 1-shot ratio of the scoring time (search + score + map) for
``auto``, and, given the rest of a re-run per image (``--rerun-other-ms``, e.g. from
``bench/pipeline.py --shots 1``: re-run ms/img minus its scoring ms/img), the re-run ratio
(target: within 2x).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import numpy as np

from anomalydino_core.cpu import set_threads
from anomalydino_core.few_shot import FewShotScorer

#: name -> (grid h, grid w, dims, views per reference, map size (H, W))
CASES = {
    "bottle-vits14": (32, 32, 384, 8, (900, 900)),
    "bottle-lite0": (28, 28, 152, 8, (900, 900)),
    "tall-lite0": (28, 70, 152, 2, (500, 1250)),
    "tall-vits14": (32, 80, 384, 2, (500, 1250)),
}


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), "?"
    )
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        flags = ""
    extra = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model} ({', '.join(extra) or 'no bf16 flags'})"


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} [{min(values):.0f}-{max(values):.0f}]"


def run_case(name: str, shots: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    gh, gw, dim, views, size = CASES[name]
    views = views if args.rotation == "agnostic" else 1
    bank = rng.standard_normal((shots * views, gh, gw, dim), dtype=np.float32)
    queries = [rng.standard_normal((gh, gw, dim), dtype=np.float32) for _ in range(args.chunk)]
    scorers = {}
    for method in args.methods.split(","):
        forced = None if method == "auto" else method
        scorers[method] = FewShotScorer(index_kind=args.index, search_method=forced).fit(list(bank))
    search = {m: [] for m in scorers}
    total = {m: [] for m in scorers}
    for rep in range(args.repeats + 1):
        for method, scorer in scorers.items():
            t0 = time.perf_counter()
            patches = scorer.patch_distances(queries)
            t1 = time.perf_counter()
            for patch in patches:
                scorer.result(patch, image_size=size)
            t2 = time.perf_counter()
            if rep:  # the first round warms up (and lets ``auto`` measure)
                search[method].append(1e3 * (t1 - t0) / args.chunk)
                total[method].append(1e3 * (t2 - t0) / args.chunk)
    auto = scorers.get("auto")
    chosen = auto.index.method_for(gh * gw * args.chunk) if auto else "-"
    gflop = 2 * gh * gw * auto_bank(scorers) * dim / 1e9
    for method in scorers:
        med = statistics.median(search[method])
        print(
            f"{name:<14}{shots:>6}{auto_bank(scorers):>9}{gh * gw:>7}{method:>7}"
            f"{_ms(search[method]):>22}{_ms(total[method]):>22}{gflop / med * 1e3:>8.0f}",
            flush=True,
        )
    if auto:
        cal = auto.index._calibration
        probe = ", ".join(f"{k} {v:.1f}" for k, v in cal.ms.items()) if cal else "none (small)"
        print(f"{'':<14}auto chose {chosen!r}; probe ms: {probe}")
    return {m: statistics.median(v) for m, v in total.items()}


def auto_bank(scorers: dict) -> int:
    return next(iter(scorers.values())).bank_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shots", default="1,16")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--chunk", type=int, default=1, help="images per search")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--methods", default="faiss,torch,auto")
    p.add_argument("--index", default="exact", choices=["exact", "exact_bf16"])
    p.add_argument("--rotation", choices=["agnostic", "informed"], default="agnostic")
    p.add_argument("--rerun-other-ms", type=float, default=None)
    args = p.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(
        f"CPU: {cpu_name()}; threads={args.threads}; index={args.index}; chunk={args.chunk}; "
        f"rotation={args.rotation}"
    )
    print(
        f"{'case':<14}{'shots':>6}{'bank':>9}{'query':>7}{'method':>7}"
        f"{'search ms/img':>22}{'search+score+map':>22}{'GFLOP/s':>8}"
    )
    totals: dict[tuple[str, int], dict] = {}
    for name in args.cases.split(","):
        for shots in (int(s) for s in args.shots.split(",")):
            totals[(name, shots)] = run_case(name, shots, args, rng)
    print()
    for name in args.cases.split(","):
        one, many = totals.get((name, 1)), totals.get((name, 16))
        if not (one and many):
            continue
        for method in one:
            line = f"{name} {method}: scoring 16-shot / 1-shot = {many[method] / one[method]:.2f}"
            if args.rerun_other_ms is not None:
                other = args.rerun_other_ms
                ratio = (other + many[method]) / (other + one[method])
                line += f"; re-run (+{other:.0f} ms/img other) {ratio:.2f} (target <= 2)"
            print(line)


if __name__ == "__main__":
    main()
