"""Figures of the adaptive audit: attack success versus eps and versus gradient steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from service.manifest import MANIFEST_FILE, Manifest
from training.audit.jobs import plan_jobs
from training.audit.store import load_job
from training.audit.subject import AuditConfig, Models
from training.modelio import model_version_dir
from training.torch_scoring import served_kind


def served_of(cfg: AuditConfig, models: set[str]) -> dict[str, str]:
    """The score each model with rows is served on (its manifest's), as the rows name it."""
    out = {}
    for m in sorted(models):
        try:
            manifest = Manifest.load(model_version_dir(cfg.models_dir, m) / MANIFEST_FILE)
        except (FileNotFoundError, ValueError):
            continue  # rows of a model no longer in the repository
        out[m] = served_kind(manifest.score)
    return out


def _at_served_t(r: dict[str, object], served: dict[str, str]) -> bool:
    """An L-inf attack row against the model's served score at the manifest's T."""
    return (
        r["norm"] == "linf"
        and r["attack"] != "none"
        and r["clean_refusal"] is None
        and r["score"] == served.get(str(r["model"]))
    )


def success_vs_eps(rows: list[dict[str, object]], served: dict[str, str], path: Path) -> None:
    """Per model: attack success against the served T for every L-inf attack, by eps."""
    models = sorted({str(r["model"]) for r in rows if _at_served_t(r, served)})
    fig = Figure(figsize=(5.5 * max(1, len(models)), 4))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(models))))
    for ax, model in zip(axes, models, strict=False):
        sel = [r for r in rows if r["model"] == model and _at_served_t(r, served)]
        for attack in sorted({str(r["attack"]) for r in sel}):
            pts = sorted(
                (float(r["eps"]), float(r["attack_success"]), int(r["n"]))
                for r in sel
                if r["attack"] == attack
            )
            n = min(p[2] for p in pts)
            style = {"lw": 2.5, "color": "black"} if attack == "worst-case" else {"marker": "o"}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{attack} (n >= {n})", **style)
        ax.set(
            title=f"{model}, {served[model]} at the served T",
            xlabel="L-inf eps (pixels in [0, 1])",
            ylabel="attack success (wrong and accepted)",
            ylim=(-0.02, 1.02),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def k_density_vs_j(rows: list[dict[str, object]], path: Path) -> None:
    """Per model and eps: worst-case attack success against K-density (T for 5% of clean
    images) beside J at the served T, as grouped bars."""

    def worst(model: str, score: str, eps: float) -> float | None:
        hits = [
            r
            for r in rows
            if (r["model"], r["score"], r["attack"], r["norm"])
            == (model, score, "worst-case", "linf")
            and float(r["eps"]) == eps
            and (score != "j" or r["clean_refusal"] is None)
        ]
        return float(max(hits, key=lambda r: int(r["n"]))["attack_success"]) if hits else None

    kd = [r for r in rows if r["score"] == "k_density" and r["attack"] == "worst-case"]
    models = sorted({str(r["model"]) for r in kd})
    eps_all = sorted({float(r["eps"]) for r in kd})
    fig = Figure(figsize=(5.5 * max(1, len(models)), 3.8))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(models))))
    x = np.arange(len(eps_all))
    for ax, model in zip(axes, models, strict=False):
        for k, (score, label) in enumerate((("j", "J, served T"), ("k_density", "K-density"))):
            vals = [worst(model, score, e) for e in eps_all]
            ax.bar(x + (k - 0.5) * 0.38, [np.nan if v is None else v for v in vals], 0.38,
                   label=label)  # fmt: skip
        ax.set_xticks(x, [f"eps {e:g}" for e in eps_all])
        ax.set(title=model, ylabel="attack success (wrong and accepted)", ylim=(0, 1.05))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def success_vs_steps(models: Models, path: Path) -> None:
    """Share of images won within s gradient steps (all restarts counted), headline attack."""
    cfg = models.cfg
    fig = Figure(figsize=(5.5 * len(cfg.models), 4))
    axes = np.atleast_1d(fig.subplots(1, len(cfg.models)))
    for ax, name in zip(axes, cfg.models, strict=True):
        model = models[name]
        for job in plan_jobs("headline", (name,), cfg.dry_run, models.served()):
            saved = load_job(cfg, model, job)
            if saved is None:
                continue
            won, spent = saved["served_won"], saved["spent"]
            budget = job.attack.steps * job.attack.restarts
            s = np.arange(budget + 1)
            curve = [(won & (spent <= k)).mean() for k in s]
            ax.plot(s, curve, label=f"eps {job.attack.eps:g} (n {len(won)})")
        ax.set(
            title=f"{name}: Lagrangian PGD, 5 restarts x 200 steps",
            xscale="symlog",
            xlabel="gradient steps spent on the image",
            ylabel="share of images won",
            ylim=(-0.02, 1.02),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_figures(models: Models, rows: list[dict[str, object]]) -> None:
    """The three PNGs next to the JSON rows, and the tables in the doc beside them."""
    from training.repro.common import update_section

    cfg = models.cfg
    folder = cfg.out_json.parent
    served = served_of(cfg, {str(r["model"]) for r in rows})
    success_vs_eps(rows, served, folder / "success-vs-eps.png")
    success_vs_steps(models, folder / "success-vs-steps.png")
    k_density_vs_j(rows, folder / "k-density-vs-j.png")
    doc = folder.with_suffix(".md")
    if doc.exists():
        update_section(doc, "adaptive", "Results", markdown(rows, served))
        update_section(doc, "adaptive-kdensity", "K-density", k_density_markdown(rows))


KD_COLUMNS = ("worst-case", "lagrangian", "selective", "orthogonal")


def k_density_markdown(rows: list[dict[str, object]]) -> str:
    """Attack success against K-density per model and eps, beside J's worst case."""
    from training.evaluation import table

    def best(**want: object) -> dict[str, object] | None:
        hits = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
        return max(hits, key=lambda r: int(r["n"])) if hits else None

    kd = [r for r in rows if r["score"] == "k_density" and r["norm"] == "linf"]
    lines = []
    for m, eps in sorted({(str(r["model"]), float(r["eps"])) for r in kd if r["attack"] != "none"}):
        kd_at = {"model": m, "score": "k_density", "eps": eps, "restarts": 5}
        cells = [_cell(best(**kd_at, attack=a)) for a in KD_COLUMNS]
        t = best(**kd_at, attack="lagrangian")
        long = best(model=m, score="k_density", attack="lagrangian", eps=eps, steps=1000)
        j = best(model=m, score="j", attack="worst-case", eps=eps, clean_refusal=None)
        tval = "-" if t is None else f"{float(t['threshold']):.4g}"
        lines.append([m, f"{eps:g}", tval, *cells, _cell(long), _cell(j)])
    if not lines:
        return "(not run yet)"
    return "\n".join(
        [
            "Attack success against K-density at the T refusing 5% of clean images 5,000-9,999 "
            "(200 steps x 5 restarts, or one restart of 1,000 steps); the last column is the "
            "worst case against J at the served T, for comparison.",
            "",
            table(
                ["model", "eps", "T", *KD_COLUMNS, "1 x 1,000 steps", "J, served T, worst case"],
                lines,
            ),
        ]
    )


COLUMNS = ("worst-case", "lagrangian", "selective", "lagrangian-ce", "orthogonal", "pgd")


def _cell(r: dict[str, object] | None) -> str:
    if r is None:
        return "-"
    done = "" if r["n"] == r.get("planned_n", r["n"]) else f" of {r['planned_n']}"
    return f"{100 * float(r['attack_success']):.1f}% (n {r['n']}{done})"


def markdown(rows: list[dict[str, object]], served: dict[str, str]) -> str:
    """Tables of the rows: attack success per model, score, eps and attack; clean figures per
    T. `served` names each model's served score: rows at the manifest's T on another score
    were measured when the model was served on that one."""
    from training.evaluation import table

    def find(**want: object) -> dict[str, object] | None:
        hits = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
        return max(hits, key=lambda r: int(r["n"])) if hits else None

    models = sorted({str(r["model"]) for r in rows})
    body = [
        "Attack success (share of images served a wrong, accepted label) at the served T, on "
        "the score named; handled = 1 - success. `n of N`: a run still in progress.",
        "",
    ]
    lines = []
    for m in models:
        attacked = [
            r
            for r in rows
            if r["model"] == m
            and r["norm"] == "linf"
            and r["attack"] != "none"
            and r["clean_refusal"] is None
        ]
        # The served score first; another score at the manifest's T is from an earlier manifest.
        scores = sorted({str(r["score"]) for r in attacked}, key=lambda s: s != served.get(m))
        for score in scores:
            name = score if score == served.get(m) else f"{score} (served before; T then)"
            for eps in sorted({float(r["eps"]) for r in attacked if r["score"] == score}):
                cells = [
                    _cell(
                        find(
                            model=m,
                            score=score,
                            attack=a,
                            eps=eps,
                            clean_refusal=None,
                            steps=200,
                            restarts=5,
                        )
                    )
                    for a in COLUMNS
                ]
                cells.append(
                    _cell(
                        find(model=m, score=score, attack="lagrangian", eps=eps, clean_refusal=0.01)
                    )
                )
                cells.append(
                    _cell(
                        find(
                            model=m,
                            score="confidence",
                            attack="lagrangian",
                            eps=eps,
                            clean_refusal=0.05,
                        )
                    )
                )
                cells.append(_cell(find(model=m, score=score, attack="lagrangian", eps=eps,
                                        clean_refusal=None, steps=1000)))  # fmt: skip
                lines.append([m, name, f"{eps:g}", *cells])
    body.append(
        table(
            [
                "model",
                "score",
                "eps",
                *COLUMNS,
                "at T for 1%",
                "confidence score, T for 5%",
                "1 x 1,000 steps",
            ],
            lines,
        )
    )
    body += [
        "",
        "L2 budgets (pixel units; an MNIST image has 784 pixels): the Lagrangian attack with L2 "
        "steps (`lagrangian`), C&W-L2 with the score term (its smallest winning perturbation "
        "within the budget) and the worst case of the two, at the T named:",
        "",
    ]
    l2 = [r for r in rows if r["norm"] == "l2"]
    l2_lines = []
    for m, score, refusal in sorted(
        {(str(r["model"]), str(r["score"]), r["clean_refusal"]) for r in l2}, key=str
    ):
        t_name = "served T" if refusal is None else f"T for {float(refusal):.0%}"  # type: ignore[arg-type]
        for eps in sorted({float(r["eps"]) for r in l2 if r["model"] == m and r["score"] == score}):
            cells = [
                _cell(
                    find(model=m, score=score, attack=a, eps=eps, clean_refusal=refusal, norm="l2")
                )
                for a in ("lagrangian", "cw-l2", "worst-case")
            ]
            l2_lines.append([m, f"{score}, {t_name}", f"{eps:g}", *cells])
    body.append(
        table(["model", "score", "L2 budget", "lagrangian", "cw-l2", "worst case"], l2_lines)
        if l2_lines
        else "(not run yet)"
    )
    body += ["", "Clean test images 0-4,999 at each threshold:", ""]
    clean = [
        [
            str(r["model"]),
            str(r["score"]),
            "manifest"
            if r["clean_refusal"] is None
            else f"{float(r['clean_refusal']):.0%} of images 5,000-9,999",
            f"{float(r['threshold']):.4g}",
            f"{100 * float(r['clean_accuracy']):.2f}%",
            f"{100 * float(r['coverage']):.2f}%",
            f"{100 * float(r['accuracy_of_accepted']):.2f}%",
            f"{100 * float(r['attack_success']):.2f}%",
        ]
        for r in rows
        if r["attack"] == "none"
    ]
    body.append(
        table(
            [
                "model",
                "score",
                "T from",
                "T",
                "accuracy",
                "coverage",
                "accuracy of accepted",
                "wrong and accepted",
            ],
            clean,
        )
    )
    return "\n".join(body)
