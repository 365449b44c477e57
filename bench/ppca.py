"""PPCA fitting: closed form vs exact EM vs stochastic EM vs scikit-learn, and EM's cost per iteration;
stochastic EM by batch size and M'-step against exact EM, with a plot of the log-likelihood against rows seen.

    python -m bench.ppca                 # both sections of docs/benchmarks.md, and docs/ppca_sem.png
    python -m bench.ppca --only sem      # only "PPCA stochastic EM" (a few minutes on 2 cores)
    python -m bench.ppca --no-save       # print, record nothing
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from sklearn.decomposition import PCA

from bench.report import DOC, publish, table
from training.data import digits_raw, load_dataset
from training.ppca import PPCA, PPCAConfig, closed_form, em_step, init_from_data, mean_log_prob
from training.ppca_sem import SEMSettings, StochasticEM

EM_TOL = 1e-4  # nats/image from the closed-form optimum
SEM_TOL = 0.5
PLOT = DOC.parent / "ppca_sem.png"


def _em_to_tolerance(x, d, best, max_iter=20_000):
    """Iterations and seconds (EM steps only, not the monitoring) until within EM_TOL of `best`."""
    model = init_from_data(PPCA(PPCAConfig(x.shape[1], d)), x, torch.Generator().manual_seed(0))
    seconds = 0.0
    for it in range(1, max_iter + 1):
        t = time.perf_counter()
        em_step(model, x)
        seconds += time.perf_counter() - t
        gap = best - mean_log_prob(model, x)
        if gap < EM_TOL:
            return it, seconds, gap
    return max_iter, seconds, gap


def _sem(x, d, best, epochs, batch=100):
    """Stochastic EM with the default settings: (final gap, seconds of stepping, (epoch, seconds) within SEM_TOL)."""
    g = torch.Generator().manual_seed(0)
    model = init_from_data(PPCA(PPCAConfig(x.shape[1], d)), x, g)
    sem = StochasticEM(model, x, SEMSettings(batch_size=batch), g)
    seconds, reached = 0.0, None
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        sem.advance(len(x))
        seconds += time.perf_counter() - t
        gap = best - mean_log_prob(model, x)
        if reached is None and gap < SEM_TOL:
            reached = (epoch, seconds)
    return gap, seconds, reached


def run(sem_epochs: int) -> str:
    torch.set_num_threads(torch.get_num_threads())
    mnist = load_dataset("mnist5k", valid_fraction=0.0)
    cases = [("digits (all 1,797 rows)", digits_raw(), None, 10),
             ("mnist5k (4,000 training rows)", mnist.train, mnist.test, 40)]
    rows, notes = [], []
    for name, x_np, test_np, d in cases:
        x = torch.as_tensor(x_np)
        t = time.perf_counter()
        model = PPCA(PPCAConfig(x.shape[1], d)).set_parameters(*closed_form(x, d))
        cf_seconds = time.perf_counter() - t
        best = mean_log_prob(model, x)
        t = time.perf_counter()
        sk = PCA(n_components=d, svd_solver="full").fit(x_np)  # exact SVD, not randomized
        sk_seconds = time.perf_counter() - t
        sk_score = sk.score(x_np)
        em_it, em_s, em_gap = _em_to_tolerance(x, d, best)
        sem_gap, sem_s, sem_reached = _sem(x, d, best, sem_epochs)
        rows.append([name, d, best, sk_score, best - sk_score, f"{cf_seconds:.3f}", f"{sk_seconds:.3f}",
                     f"{em_it} it / {em_s:.2f} s", f"{em_gap:.1e}",
                     f"{sem_reached[0]} ep / {sem_reached[1]:.2f} s" if sem_reached else "not reached",
                     f"{sem_gap:.3f} ({sem_epochs} ep, {sem_s:.1f} s)"])
        if test_np is not None:
            test = torch.as_tensor(test_np)
            notes.append(f"- {name}, d = {d}: test log-likelihood {mean_log_prob(model, test):.4f} nats/image "
                         f"(closed form) vs scikit-learn `PCA.score` on the test rows {sk.score(test_np):.4f}.")
        print(rows[-1])

    body = table(["data", "d", "ML log-lik (nats/img)", "sklearn PCA.score", "ML - sklearn", "closed form s",
                  "sklearn fit s", f"EM to {EM_TOL:g} of ML", "EM gap", f"SEM to {SEM_TOL} of ML",
                  "SEM final gap"], rows)
    body += "\n\n" + "\n".join(notes)
    body += ("\n\nLog-likelihoods are exact, in nats per image, on the rows fitted (scikit-learn's `PCA.score` "
             "divides the covariance by N - 1, the ML solution by N, hence the small difference). EM starts from "
             "W ~ 0.1 * std * N(0, 1), sigma2 = pixel variance; times count the EM steps, not the monitoring. "
             "SEM: minibatch 100, the default natural step and step size (training/ppca_sem.py); the section "
             "\"PPCA stochastic EM\" has the other batch sizes and steps.")

    # EM's cost per iteration against N and d (mnist5k rows).
    scale_rows = []
    x_all = torch.as_tensor(mnist.train)
    for n in (1000, 2000, 4000):
        for d in (10, 20, 40, 80):
            x = x_all[:n]
            model = init_from_data(PPCA(PPCAConfig(784, d)), x, torch.Generator().manual_seed(0))
            em_step(model, x)
            reps = 10
            t = time.perf_counter()
            for _ in range(reps):
                em_step(model, x)
            per_it = (time.perf_counter() - t) / reps * 1e3
            scale_rows.append([n, d, f"{per_it:.2f}", f"{per_it / (n * d) * 1e6:.2f}"])
    body += "\n\nEM time per iteration on mnist5k rows (D = 784): O(N D d), so ms / (N d) stays roughly flat.\n\n"
    body += table(["N", "d", "ms / iteration", "ns per (N*d)"], scale_rows)
    return body


def _curve_run(x, best, d, epochs, evals_per_epoch, settings: SEMSettings | None):
    """One fit (exact EM when ``settings`` is None), evaluated as it goes.

    Returns (points seen, gaps) and (epochs, seconds) to SEM_TOL or None, and the final gap. Seconds
    count the fitting only, not the evaluations. An EM iteration sees all N rows.
    """
    N = len(x)
    g = torch.Generator().manual_seed(0)
    model = init_from_data(PPCA(PPCAConfig(x.shape[1], d)), x, g)
    sem = None if settings is None else StochasticEM(model, x, settings, g)
    points, gaps = [0], [best - mean_log_prob(model, x)]
    seconds, reached = 0.0, None
    evals = epochs * (1 if sem is None else evals_per_epoch)
    for k in range(1, evals + 1):
        t = time.perf_counter()
        if sem is None:
            em_step(model, x)
        else:
            # Whole steps until k/evals_per_epoch epochs of rows have been seen.
            sem.advance(k * N // evals_per_epoch - sem.points_seen)
        seconds += time.perf_counter() - t
        points.append(N * k if sem is None else sem.points_seen)
        gaps.append(best - mean_log_prob(model, x))
        if reached is None and gaps[-1] < SEM_TOL:
            reached = (points[-1] / N, seconds)
    return (points, gaps), reached, gaps[-1], seconds


def run_sem(digits_epochs: int, mnist_epochs: int, plot: Path, evals_per_epoch: int = 4) -> str:
    """Batch 1, 10 and 100 with both M'-steps against exact EM, on digits (d = 10) and mnist5k (d = 40);
    the curves go to ``plot``."""
    # One thread: a one-row step is a few small matrix products, which a second thread only slows down.
    torch.set_num_threads(1)
    mnist = load_dataset("mnist5k", valid_fraction=0.0)
    cases = [("digits", "digits (all 1,797 rows)", digits_raw(), 10, digits_epochs),
             ("mnist5k", "mnist5k (4,000 training rows)", mnist.train, 40, mnist_epochs)]
    settings = [(f"{step}, B = {B}", SEMSettings(step=step, batch_size=B))
                for step in ("natural", "plain") for B in (1, 10, 100)]
    settings.append(("natural, B = 1, with replacement", SEMSettings(batch_size=1, sampling="with-replacement")))
    rows, curves = [], {}
    for key, name, x_np, d, epochs in cases:
        x = torch.as_tensor(x_np)
        best = mean_log_prob(PPCA(PPCAConfig(x.shape[1], d)).set_parameters(*closed_form(x, d)), x)
        curves[key] = {"best": best, "name": f"{name}, d = {d}", "runs": {}}
        for label, s in [("exact EM", None), *settings]:
            curve, reached, final, seconds = _curve_run(x, best, d, epochs, evals_per_epoch, s)
            curves[key]["runs"][label] = curve
            unit = "it" if s is None else "ep"
            to_gap = f"{reached[0]:.3g} {unit} / {reached[1]:.2f} s" if reached else "not reached"
            rows.append([key, d, label, to_gap,
                         f"{final:.3f}", f"{epochs} {unit} / {seconds:.1f} s"])
            print(rows[-1], flush=True)
    _plot(curves, plot)
    body = table(["data", "d", "fit", f"to {SEM_TOL} nats/img of the optimum", "final gap (nats/img)", "run"], rows)
    body += (f"\n\n![log-likelihood against rows seen]({plot.name})\n\n"
             "The gap is the closed-form optimum's log-likelihood minus the fit's, exact, in nats per image, on the "
             "rows fitted. Stochastic EM uses the default step size (`--kappa0 auto`: min(1 / L_t, B eta(n)), "
             "eta(n) = 0.1 / (d + 1) / (1 + n / N), no tuning per batch size or dataset) and shuffled passes unless "
             "marked; an epoch is N rows whatever the batch size, an EM iteration one pass over the N rows. "
             f"Gaps are measured {evals_per_epoch} times per epoch (after each EM iteration), so 'to 0.5' is read "
             f"to 1/{evals_per_epoch} epoch; seconds count the fitting, not the evaluations, on one torch thread. "
             "All fits start from the same point (mu = the mean, sigma2 = the mean pixel variance, W small random).")
    return body


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.8))
    colours = {1: "tab:blue", 10: "tab:orange", 100: "tab:green"}
    for ax, (_, case) in zip(axes, curves.items(), strict=True):
        for label, (points, gaps) in case["runs"].items():
            floor = [max(gap, 1e-3) for gap in gaps]  # a log axis; SEM can end a hair above the optimum
            if label == "exact EM":
                ax.plot(points, floor, "k-o", markersize=3, label=label, zorder=3)
                continue
            batch = int(label.split("B = ")[1].split(",")[0])
            style = "--" if label.startswith("plain") else ":" if "replacement" in label else "-"
            ax.plot(points, floor, style, color=colours[batch], label=label)
        ax.axhline(SEM_TOL, color="gray", linewidth=1, linestyle="--")
        ax.set_yscale("log")
        ax.set_xlabel("data rows seen")
        ax.set_ylabel("optimum - log-likelihood (nats / image)")
        ax.set_title(f"{case['name']}: optimum {case['best']:.2f} nats/image")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("PPCA: stochastic EM (batch size, M'-step) and exact EM, log-likelihood against rows seen")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["fitting", "sem"], default=None, help="run one section only")
    parser.add_argument("--sem-epochs", type=int, default=60, help="'PPCA fitting': SEM epochs")
    parser.add_argument("--digits-epochs", type=int, default=10, help="'PPCA stochastic EM': epochs on digits")
    parser.add_argument("--mnist-epochs", type=int, default=30, help="'PPCA stochastic EM': epochs on mnist5k")
    parser.add_argument("--no-save", action="store_true", help="print only: no docs/benchmarks.md, no plot")
    args = parser.parse_args()
    plot = Path(tempfile.mkdtemp()) / PLOT.name if args.no_save else PLOT
    if args.only in (None, "fitting"):
        publish("PPCA fitting", run(args.sem_epochs), module="bench.ppca", save=not args.no_save)
    if args.only in (None, "sem"):
        publish("PPCA stochastic EM", run_sem(args.digits_epochs, args.mnist_epochs, plot), module="bench.ppca",
                save=not args.no_save)
        print(f"plot: {plot}")


if __name__ == "__main__":
    main()
