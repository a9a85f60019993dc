"""Fit a single Gaussian to a bimodal target under every method and plot it (the talk's pictures).

The target is a two-component Gaussian mixture discretised on a 1-D grid (a categorical
distribution over G grid points, the "vocabulary"); the student is a categorical whose logits are
a Gaussian log-density with a learnable mean and log standard deviation. Each fit minimises
kdplug.get(method, **params)(student_logits, target_logits) with Adam; nothing else defines the
losses. Writes, into --out:

  toy_fkl_rkl.png     forward KL is mean-seeking (one wide Gaussian over both modes),
                      reverse KL is mode-seeking (one narrow Gaussian on one mode)
  toy_methods.png     every registered method with its default parameters
  toy_abkd_grid.png   ABKD's alpha-beta grid: (1, 0) is FKL, (0, 1) is RKL
  toy_amid_alpha.png  AMiD's alpha sweep: the alpha-mixture assistant r between the target and a
                      wide student, and the student each alpha fits

and prints each fit's mean and standard deviation (--json for machines). Seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

GRID = (-8.0, 8.0, 321)
TARGET = ((0.6, -2.5, 0.8), (0.4, 2.5, 0.9))   # (weight, mean, std) per mode
INIT = (-1.0, 1.0)                              # initial (mean, std), the same for every fit
ABKD_ALPHAS = (0.0, 0.5, 1.0, 1.5)
ABKD_BETAS = (0.0, 0.5, 1.0, 1.5)
AMID_ALPHAS = (-5.0, -3.0, -1.0, 0.0, 0.5, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="kdplug-toy-out", metavar="DIR",
                        help="where the PNGs go (default ./kdplug-toy-out)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per fit (default 300)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    parser.add_argument("--json", action="store_true", help="print the fitted parameters as JSON")
    parser.add_argument("--no-plots", action="store_true", help="fit and print only")


# ---------------------------------------------------------------------------------------------
def grid():
    import torch
    return torch.linspace(*GRID[:2], GRID[2], dtype=torch.float64)


def target_logits(x):
    import torch
    parts = [math.log(w) - 0.5 * ((x - m) / s) ** 2 - math.log(s) for w, m, s in TARGET]
    return torch.logsumexp(torch.stack(parts), dim=0)


def gaussian_logits(x, mean, log_std):
    return -0.5 * ((x - mean) / log_std.exp()) ** 2


def moments(x, logits):
    import torch
    p = torch.softmax(logits, -1)
    mean = float((p * x).sum())
    return mean, float(((p * (x - mean) ** 2).sum()).sqrt())


def fit(name: str, params: dict, steps: int, lr: float) -> dict:
    """Fit the Gaussian student to the target under one method."""
    import torch
    import kdplug

    x = grid()
    t = target_logits(x)[None]
    params = dict(params)
    if name == "taid":
        params.setdefault("total_steps", steps)  # t reaches t_end by the last step
    loss_fn = kdplug.get(name, backend="torch", **params)
    extra = {}
    if getattr(loss_fn.recipe, "by", None) == "student_generated":
        extra["student_generated"] = torch.zeros(1, dtype=torch.bool)
    mean = torch.tensor(INIT[0], dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(INIT[1]), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=lr)
    loss = None
    for _ in range(steps):
        loss = loss_fn(gaussian_logits(x, mean, log_std)[None], t, **extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_fn.step(loss.detach())
    with torch.no_grad():
        q = gaussian_logits(x, mean, log_std)
        kl_fn = kdplug.get("fkl", backend="torch")
        rkl_fn = kdplug.get("rkl", backend="torch")
        m, s = moments(x, q)
        return dict(method=name, params={k: v for k, v in params.items()}, mean=m, std=s,
                    loss=float(loss), kl_target_student=float(kl_fn(q[None], t)),
                    kl_student_target=float(rkl_fn(q[None], t)))


def assistant(p_logits, q_logits, alpha: float, lam: float = 0.5):
    """AMiD's alpha-mixture r ∝ (lam p^a + (1-lam) q^a)^(1/a), a = (1-alpha)/2 (alpha >= 1: geometric),
    only for drawing; the fits use kdplug's own."""
    import torch
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    if alpha >= 1:
        return torch.log_softmax(lam * lp + (1 - lam) * lq, -1)
    a = (1 - alpha) / 2
    mix = torch.logsumexp(torch.stack([math.log(lam) + a * lp, math.log(1 - lam) + a * lq]), 0) / a
    return torch.log_softmax(mix, -1)


# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        print(f"kdplug toy: error: argument --steps: expected a positive integer, got {args.steps}", file=sys.stderr)
        return 2
    if not args.lr > 0:
        print(f"kdplug toy: error: argument --lr: expected a number > 0, got {args.lr}", file=sys.stderr)
        return 2
    import warnings
    warnings.filterwarnings("ignore", message=".*using the PyTorch path.*")
    import kdplug

    t0 = time.perf_counter()
    names = [m.name for m in kdplug.list_methods()]
    fits = {"methods": [fit(n, {}, args.steps, args.lr) for n in names]}
    fits["abkd_grid"] = [fit("abkd", {"alpha": a, "beta": b}, args.steps, args.lr)
                         for a in ABKD_ALPHAS for b in ABKD_BETAS]
    fits["amid_alpha"] = [fit("amid", {"alpha": a}, args.steps, args.lr) for a in AMID_ALPHAS]
    x = grid()
    t = target_logits(x)
    tm, ts = moments(x, t)
    result = dict(target=dict(modes=[dict(weight=w, mean=m, std=s) for w, m, s in TARGET], mean=tm, std=ts),
                  init=dict(mean=INIT[0], std=INIT[1]), steps=args.steps, lr=args.lr, **fits)
    files = []
    if not args.no_plots:
        os.makedirs(args.out, exist_ok=True)
        files = plot(result, args.out)
    result["files"] = files
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"target: {' + '.join(f'{w:g}·N({m:+g}, {s:g}²)' for w, m, s in TARGET)} on {GRID[2]} grid points "
          f"(mean {tm:+.2f}, std {ts:.2f}); student: one Gaussian from N({INIT[0]:+g}, {INIT[1]:g}²), "
          f"{args.steps} Adam steps")
    print(_table("every method, default parameters", result["methods"], lambda f: f["method"]))
    print(_table("ABKD alpha-beta grid", result["abkd_grid"],
                 lambda f: f"abkd α={f['params']['alpha']:g} β={f['params']['beta']:g}"))
    print(_table("AMiD alpha sweep", result["amid_alpha"], lambda f: f"amid α={f['params']['alpha']:g}"))
    if files:
        print("wrote " + ", ".join(files))
    print(f"({result['seconds']:.1f} s)")
    return 0


def _mode(mean: float, std: float) -> str:
    (_, m1, _), (_, m2, _) = TARGET
    if mean - 1.5 * std <= m1 and mean + 1.5 * std >= m2:
        return "covers both modes (mean-seeking)"
    for (_, m, s), side in zip(TARGET, ("left", "right")):
        if abs(mean - m) < s:
            return f"{side} mode (mode-seeking)"
    return "in between"


def _table(title: str, rows, label) -> str:
    lines = ["", title, f"  {'fit of':<22} {'mean':>7} {'std':>6} {'KL(p‖q)':>9} {'KL(q‖p)':>9}  fit"]
    for f in rows:
        lines.append(f"  {label(f):<22} {f['mean']:+7.2f} {f['std']:6.2f} {f['kl_target_student']:9.3f} "
                     f"{f['kl_student_target']:9.3f}  {_mode(f['mean'], f['std'])}")
    return "\n".join(lines)


def plot(result: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    x = grid()
    t = target_logits(x)
    p = torch.softmax(t, -1).numpy()
    xs = x.numpy()
    by_name = {f["method"]: f for f in result["methods"]}

    def student(f):
        return torch.softmax(gaussian_logits(x, torch.tensor(f["mean"]), torch.tensor(math.log(f["std"]))), -1).numpy()

    def panel(ax, f, title, color="tab:red"):
        ax.fill_between(xs, p, color="0.8", label="target p")
        ax.plot(xs, student(f), color=color, lw=2, label="student q")
        ax.set_title(title, fontsize=9)
        ax.set_yticks([])
        ax.set_xlim(-7, 7)

    files = []
    # 1. FKL vs RKL
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    panel(axes[0], by_name["fkl"], f"forward KL(p‖q): mean-seeking\nμ={by_name['fkl']['mean']:+.2f}, "
          f"σ={by_name['fkl']['std']:.2f}", "tab:blue")
    panel(axes[1], by_name["rkl"], f"reverse KL(q‖p): mode-seeking\nμ={by_name['rkl']['mean']:+.2f}, "
          f"σ={by_name['rkl']['std']:.2f}", "tab:red")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("one Gaussian fitted to a bimodal target (kdplug toy)", fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out, "toy_fkl_rkl.png"))
    # 2. every method
    methods = result["methods"]
    cols = 4
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), sharey=True, squeeze=False)
    for ax, f in zip(axes.flat, methods):
        panel(ax, f, f"{f['method']}: μ={f['mean']:+.2f}, σ={f['std']:.2f}")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("every kdplug method (default parameters), same target and start", fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out, "toy_methods.png"))
    # 3. ABKD grid
    grid_fits = {(f["params"]["alpha"], f["params"]["beta"]): f for f in result["abkd_grid"]}
    fig, axes = plt.subplots(len(ABKD_ALPHAS), len(ABKD_BETAS), figsize=(2.6 * len(ABKD_BETAS),
                             1.9 * len(ABKD_ALPHAS)), sharex=True, sharey=True, squeeze=False)
    for i, a in enumerate(ABKD_ALPHAS):
        for j, b in enumerate(ABKD_BETAS):
            f = grid_fits[(a, b)]
            note = " (FKL)" if (a, b) == (1.0, 0.0) else " (RKL)" if (a, b) == (0.0, 1.0) else ""
            panel(axes[i, j], f, f"α={a:g}, β={b:g}{note}: σ={f['std']:.2f}", "tab:purple")
    fig.suptitle("ABKD: α-β divergence D_AB(p‖q) fitted by one Gaussian (rows α, columns β)", fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out, "toy_abkd_grid.png"))
    # 4. AMiD alpha sweep
    fig, axes = plt.subplots(2, len(AMID_ALPHAS), figsize=(2.6 * len(AMID_ALPHAS), 4.2), sharey="row",
                             squeeze=False)
    wide = gaussian_logits(x, torch.tensor(INIT[0]), torch.tensor(math.log(INIT[1])))
    q_wide = torch.softmax(wide, -1).numpy()
    amid = {f["params"]["alpha"]: f for f in result["amid_alpha"]}
    for j, a in enumerate(AMID_ALPHAS):
        ax = axes[0, j]
        ax.fill_between(xs, p, color="0.8")
        ax.plot(xs, q_wide, color="tab:blue", lw=1, ls="--")
        ax.plot(xs, assistant(t, wide, a).exp().numpy(), color="tab:green", lw=2)
        ax.set_title(f"assistant r, α={a:g}" + (" (geometric)" if a >= 1 else " (arithmetic)" if a == -1 else ""),
                     fontsize=9)
        ax.set_yticks([])
        ax.set_xlim(-7, 7)
        panel(axes[1, j], amid[a], f"fit with amid α={a:g}: σ={amid[a]['std']:.2f}", "tab:green")
    axes[0, 0].legend(["target p", "student q (start)", "assistant r"], fontsize=7, loc="upper right")
    fig.suptitle("AMiD: the α-mixture assistant between target and student (top), and the student each α fits "
                 "(bottom)", fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out, "toy_amid_alpha.png"))
    return files


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt
    path = os.path.join(out, name)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
