"""The serving benchmark's report: the markdown table and the performance targets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Cell:
    server: str
    api: str
    images: int
    concurrency: int
    req_s: float
    img_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    raw_img_s: float = 0.0  # raw onnxruntime at the same batch size, measured just before
    cpu_ms: float = 0.0  # the server's CPU time (all its processes) per answered request
    # onnxruntime's own CPU time per image, in-process, measured just before the cell at the
    # batch the server could form: the request's images, or for 1-image requests one image per
    # client in flight (at most 64, the batcher's default largest batch).
    raw_cpu_ms_per_img: float = 0.0
    raw_cpu_batch: int = 0

    @property
    def cpu_ratio(self) -> float | None:
        """The server's CPU per image over onnxruntime's own (None: not measured)."""
        if not self.raw_cpu_ms_per_img or not self.cpu_ms:
            return None
        return self.cpu_ms / self.images / self.raw_cpu_ms_per_img


# The notsure body kind that carries the same request as a comparison server's body kind.
SAME_REQUEST = {
    "native": "native",
    "native-float": "native-float",
    "v2-json-u8": "v2-json",
    "v2-binary-u8": "v2-binary",
    "grpc": "grpc",
}
PEERS_SKIPPED = ("notsure", "no-batching")  # no-batching is notsure itself, for the 1.5x target


def targets(
    cells: list[Cell], raw: dict[str, dict[str, float]], ab: dict[str, Any] | None = None
) -> list[tuple[str, str, bool]]:
    """The service's performance targets, checked against the measured cells (and, for batching
    on vs off, the median of the alternating pairs `ab` when they were measured)."""
    out: list[tuple[str, str, bool]] = []

    def get(server: str, api: str, n: int, c: int) -> Cell | None:
        return next(
            (x for x in cells if (x.server, x.api, x.images, x.concurrency) == (server, api, n, c)),
            None,
        )

    # Ahead of every compared server, cell by cell, on the same request in its own body kind.
    pairs = [
        (a, b)
        for b in cells
        if b.server not in PEERS_SKIPPED and b.api in SAME_REQUEST
        for a in [get("notsure", SAME_REQUEST[b.api], b.images, b.concurrency)]
        if a
    ]
    for a, b in pairs:
        out.append(
            (
                f"{b.images}-image {a.api} c={b.concurrency} ahead of {b.server} ({b.api})",
                f"{a.req_s:.0f} vs {b.req_s:.0f} req/s",
                a.req_s > b.req_s,
            )
        )
    # A peer's cell that answered nothing (it failed or timed out under that load) is behind
    # in its own line above and has no ratio to be the closest one.
    answered = [(a, b) for a, b in pairs if b.req_s > 0]
    if answered:
        a, b = min(answered, key=lambda p: p[0].req_s / p[1].req_s)
        out.append(
            (
                "ahead of every compared server at every concurrency, every body kind",
                f"closest: {a.req_s:.0f} vs {b.req_s:.0f} req/s ({b.server} {b.api}, "
                f"{b.images}-image, c={b.concurrency}, {a.req_s / b.req_s:.2f}x)",
                all(a.req_s > b.req_s for a, b in pairs),
            )
        )

    def ceiling_of(x: Cell) -> float:
        """Parallel single-thread onnxruntime runs at the cell's batch size, measured just
        before the cell (else at the start of the run)."""
        return x.raw_img_s or raw.get(f"batch{x.images}-parallel", {}).get("img_s", 0.0)

    ours = [x for x in cells if x.server == "notsure"]
    for n, floor, which in ((1, 0.8, lambda c: c >= 32), (64, 0.9, lambda c: True)):
        for api in dict.fromkeys(x.api for x in ours if x.images == n):
            group = [x for x in ours if (x.api, x.images) == (api, n) and which(x.concurrency)]
            group = [x for x in group if ceiling_of(x) > 0]
            if not group:
                continue
            worst = min(group, key=lambda x: x.img_s / ceiling_of(x))
            ratio = worst.img_s / ceiling_of(worst)
            at = "c >= 32" if n == 1 else "every concurrency"
            out.append(
                (
                    f"{n}-image {api} >= {floor:.0%} of the batch-{n} ceiling at {at}",
                    f"worst {worst.img_s:.0f} vs {ceiling_of(worst):.0f} img/s ({ratio:.0%}) "
                    f"at c={worst.concurrency}",
                    ratio >= floor,
                )
            )
    if ab:
        out.append(
            (
                "1-image c=32 >= 1.5x batching off (median of alternating pairs)",
                f"{ab['median_on']:.0f} vs {ab['median_off']:.0f} req/s, ratio median "
                f"{ab['median_ratio']:.2f}x (range {ab['min_ratio']:.2f}-{ab['max_ratio']:.2f}, "
                f"{len(ab['pairs'])} pairs)",
                ab["median_ratio"] >= 1.5,
            )
        )
    else:
        on, off = get("notsure", "native", 1, 32), get("no-batching", "native", 1, 32)
        if on and off:
            out.append(
                (
                    "1-image c=32 >= 1.5x batching off",
                    f"{on.req_s:.0f} vs {off.req_s:.0f} req/s ({on.req_s / off.req_s:.2f}x)",
                    on.req_s >= 1.5 * off.req_s,
                )
            )
    costed = [x for x in ours if x.concurrency >= 8 and x.cpu_ratio is not None]
    if costed:
        worst = max(costed, key=lambda x: x.cpu_ratio or 0.0)
        out.append(
            (
                "server CPU per image <= 1.3x onnxruntime's own at c >= 8, every body kind",
                f"worst {worst.cpu_ratio:.2f}x ({worst.api}, {worst.images}-image, "
                f"c={worst.concurrency}: {worst.cpu_ms / worst.images:.3f} vs "
                f"{worst.raw_cpu_ms_per_img:.3f} ms at batch {worst.raw_cpu_batch})",
                all((x.cpu_ratio or 0.0) <= 1.3 for x in costed),
            )
        )
    batch1 = [v["ms_per_run"] for k, v in raw.items() if k.startswith("batch1-intra")]
    if batch1:
        raw1 = min(batch1)
        for x in (x for x in ours if (x.images, x.concurrency) == (1, 1)):
            out.append(
                (
                    f"p50 at c=1 ({x.api}) within 0.4 ms of raw onnxruntime batch 1",
                    f"{x.p50_ms:.2f} ms vs {raw1:.2f} + 0.4 ms",
                    x.p50_ms <= raw1 + 0.4,
                )
            )
    return out


def ceiling(raw: dict[str, dict[str, float]]) -> str:
    """What batching can gain inside onnxruntime itself: best batched vs best batch-1 img/s."""
    best = {
        n: max(v["img_s"] for k, v in raw.items() if k.startswith(f"batch{n}-"))
        for n in ("1", "64")
    }
    return (
        f"Batching's ceiling in onnxruntime on this machine (no HTTP): best batch-64 "
        f"{best['64']:.0f} img/s vs best batch-1 {best['1']:.0f} img/s = "
        f"{best['64'] / best['1']:.2f}x."
    )


def markdown(
    cells: list[Cell],
    raw: dict[str, dict[str, float]],
    meta: dict[str, str],
    ab: dict[str, Any] | None = None,
) -> str:
    # Results written before runs were dated have no "date".
    run = f"Run {meta['date']}. " if "date" in meta else ""
    lines = [
        f"{run}Machine: {meta['machine']}; Python {meta['python']}; {meta['duration_s']} s per "
        f"cell; command `{meta['command']}`.",
        "",
        "| raw onnxruntime (in-process) | img/s | ms/run |",
        "|---|---|---|",
    ]
    for k, v in raw.items():
        ms = f"{v['ms_per_run']:.2f}" if "ms_per_run" in v else "-"
        lines.append(f"| {k} | {v['img_s']:.0f} | {ms} |")
    lines += ["", ceiling(raw)]
    lines += [
        "",
        "| server | body | images/request | concurrency | req/s | img/s | p50 ms | p99 ms "
        "| server CPU ms/request | server CPU ms/image | onnxruntime CPU ms/image (batch) "
        "| server / onnxruntime CPU | non-2xx / socket errors | ceiling img/s just before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        ratio = "-" if c.cpu_ratio is None else f"{c.cpu_ratio:.2f}x"
        raw_cpu = f"{c.raw_cpu_ms_per_img:.3f} ({c.raw_cpu_batch})" if c.raw_cpu_ms_per_img else "-"
        lines.append(
            f"| {c.server} | {c.api} | {c.images} | {c.concurrency} | {c.req_s:.1f} | "
            f"{c.img_s:.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.cpu_ms:.2f} | "
            f"{c.cpu_ms / c.images:.3f} | {raw_cpu} | {ratio} | {c.errors} | {c.raw_img_s:.0f} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for name, measured, ok in targets(cells, raw, ab):
        lines.append(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def rewrite(folder: Path) -> None:
    """Regenerate results.md from a results.json (no measurement)."""
    data = json.loads((folder / "results.json").read_text())
    cells = [Cell(**c) for c in data["cells"]]
    ab = data.get("batching_ab")
    (folder / "results.md").write_text(markdown(cells, data["raw_onnxruntime"], data["meta"], ab))
    for name, measured, ok in targets(cells, data["raw_onnxruntime"], ab):
        print(f"{'MET ' if ok else 'MISS'} {name}: {measured}")
