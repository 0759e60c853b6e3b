"""Figures the monitors log: eigenvalue scatter, adjoint/sensitivity profile, histogram.

Figures are built with matplotlib's object-oriented API on an Agg canvas
(:class:`matplotlib.backends.backend_agg.FigureCanvasAgg`): no ``pyplot`` state, no display,
and the process-wide backend the user chose is left alone. Each function returns a
:class:`matplotlib.figure.Figure` (``wandb.Image`` and TensorBoard take it as it is);
:func:`save_figure` writes a PNG.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ode_reg._checks import check_int

__all__ = [
    "eigenvalue_figure",
    "histogram_figure",
    "nfe_figure",
    "new_figure",
    "profile_figure",
    "save_figure",
]


def new_figure(width: float = 6.0, height: float = 4.0, dpi: int = 100) -> Figure:
    """A figure attached to an Agg canvas (renders without a display or ``pyplot``).

    Args:
        width: width in inches, ``> 0``.
        height: height in inches, ``> 0``.
        dpi: dots per inch, ``>= 1``.

    Raises:
        ValueError: on a non-positive size or ``dpi < 1``.

    Example::

        >>> fig = new_figure(3, 2, dpi=50)
        >>> fig.canvas.get_width_height()
        (150, 100)
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`{name}` must be a number > 0, got {value!r}")
    check_int("dpi", dpi, 1)
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _numpy(name: str, x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a tensor or an array, got {type(x).__name__}") from exc


def _positive_or_nan(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def eigenvalue_figure(
    eigs: Tensor,
    *,
    flow_eigs: Tensor | None = None,
    title: str = "Jacobian eigenvalues",
    step: int | None = None,
    samples: int | None = None,
) -> Figure:
    """Complex-plane scatter of eigenvalues, with the imaginary axis marked.

    With ``flow_eigs`` (eigenvalues of ``Q_k = W_k^T W_*`` along an orthogonal flow) a second
    panel shows them against the unit circle.

    Args:
        eigs: real or complex eigenvalues, any shape (flattened).
        flow_eigs: optional eigenvalues for the unit-circle panel.
        title: title of the first panel.
        step: the training step (shown in the title), or ``None``.
        samples: the number of sampled states the eigenvalues come from (shown in the
            title), or ``None``.

    Returns:
        The figure.

    Raises:
        ValueError: if ``eigs`` (or ``flow_eigs``) is not a tensor.

    Example::

        >>> import torch
        >>> fig = eigenvalue_figure(torch.tensor([-1 + 1j, -1 - 1j, 0.5 + 0j]))
        >>> len(fig.axes)
        1
    """
    if not isinstance(eigs, Tensor):
        raise ValueError(f"`eigs` must be a tensor, got {type(eigs).__name__}")
    if flow_eigs is not None and not isinstance(flow_eigs, Tensor):
        raise ValueError(f"`flow_eigs` must be a tensor or None, got {type(flow_eigs).__name__}")
    panels = 1 if flow_eigs is None else 2
    fig = new_figure(5.0 * panels, 4.7)
    ax = fig.add_subplot(1, panels, 1)
    e = eigs.detach().reshape(-1).to(torch.complex128).cpu().numpy()
    ax.axvline(0.0, color="0.6", lw=1.0, zorder=0)
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.scatter(e.real, e.imag, s=10, alpha=0.6, color="C0")
    ax.set_xlabel("Re λ of ∂f/∂z (1 / unit of ODE time)")
    ax.set_ylabel("Im λ (1 / unit of ODE time)")
    extra = []
    if step is not None:
        extra.append(f"training step {step}")
    if samples is not None:
        extra.append(f"{samples} states")
    if e.size:
        extra.append(f"{e.size} eigenvalues, max Re {np.max(e.real):.3g}")
    head = f"{title}\n{', '.join(extra)}" if extra else title
    ax.set_title(head, fontsize=9)
    if flow_eigs is not None:
        ax2 = fig.add_subplot(1, 2, 2)
        q = flow_eigs.detach().reshape(-1).to(torch.complex128).cpu().numpy()
        theta = np.linspace(0.0, 2.0 * math.pi, 256)
        ax2.plot(np.cos(theta), np.sin(theta), color="0.6", lw=1.0)
        ax2.scatter(q.real, q.imag, s=10, alpha=0.6, color="C1")
        ax2.set_aspect("equal")
        ax2.set_xlabel("Re λ (dimensionless)")
        ax2.set_ylabel("Im λ (dimensionless)")
        ax2.set_title("eig(W_kᵀ W_*) vs unit circle", fontsize=10)
    fig.subplots_adjust(left=0.15 / panels, right=0.97, bottom=0.12, top=0.87, wspace=0.35)
    return fig


def _log_axis(ax, values: np.ndarray, axis: str = "y") -> None:
    """Log scale with at least three labelled ticks, plain labels (no mathtext)."""
    shown = values[np.isfinite(values)]
    if not shown.size:
        return
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    lo, hi = float(shown.min()), float(shown.max())
    decades = math.log10(hi / lo) if lo > 0 else 0.0
    locator: ticker.Locator | None = None
    if decades < 3:
        # The fewest sub-decade ticks that still label three values inside the data range
        # (plain decades would leave a narrow profile with one tick or none).
        e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(float(i) for i in range(1, 10))):
            ticks = [m * 10.0**e for e in range(e0, e1 + 1) for m in subs]
            if sum(lo <= v <= hi for v in ticks) >= 3:
                locator = ticker.LogLocator(base=10.0, subs=subs)
                break
        if locator is None:  # less than a factor ~1.3: evenly spaced round numbers
            locator = ticker.MaxNLocator(nbins=5, min_n_ticks=3)
            target.set_minor_locator(ticker.NullLocator())
            pad = 0.08 * (hi - lo) if hi > lo else 0.05 * hi
            (ax.set_ylim if axis == "y" else ax.set_xlim)(max(lo - pad, lo / 2), hi + pad)
    else:
        locator = ticker.LogLocator(base=10.0, numticks=8)
    target.set_major_locator(locator)
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def _uniform(t: np.ndarray) -> bool:
    if t.size < 3:
        return False
    d = np.diff(t.astype(np.float64))
    # float32 times (t_0 + k dt) carry rounding of ~1e-6 relative; anything under 1e-3 is even.
    return bool(np.all(d > 0) and np.ptp(d) <= 1e-3 * abs(float(d.mean())))


def _title(title: str, step: int | None, samples: int | None) -> str:
    extra = []
    if step is not None:
        extra.append(f"training step {step}")
    if samples is not None:
        extra.append(f"mean over {samples} samples")
    return f"{title} ({', '.join(extra)})" if extra else title


def profile_figure(
    times: Tensor,
    adjoint_norms: Tensor,
    sensitivity_norms: Tensor | None = None,
    *,
    title: str | None = None,
    step: int | None = None,
    samples: int | None = None,
    index_label: str | None = "checkpoint index k (= input steps read, for an ODE-RNN)",
) -> Figure:
    """Log-scale profile of ``mean_i |a_{k,i}|`` (and ``|y_k|``) against the checkpoint times.

    The adjoint ``a_k = dL/dz_k`` is drawn on the left axis (units: loss per unit of state),
    the sensitivity density ``|y_k|`` (units: loss per unit of parameter per unit of time), if
    given, on its own right axis; only the curves given are drawn and named. With evenly
    spaced times a top axis shows the checkpoint index ``k`` (for an ODE-RNN, the number of
    inputs read: the pixel index of a pixel sequence). Non-positive or non-finite values are
    left out of the log-scale curves.

    Args:
        times: checkpoint times ``t_k``, shape ``(K + 1,)``.
        adjoint_norms: ``mean_i |a_{k,i}|``, shape ``(K + 1,)``.
        sensitivity_norms: ``|y_k|``, shape ``(K + 1,)``, or ``None``.
        title: the figure title; default "adjoint profile" (and "and sensitivity norms" when
            they are drawn). A caller's title that names sensitivity norms which are not
            given loses that part.
        step: the training step the profile was taken at (shown in the title), or ``None``.
        samples: the number of samples ``i`` averaged over (shown in the title), or ``None``.
        index_label: the label of the top index axis (shown for evenly spaced times), or
            ``None`` for no index axis.

    Returns:
        The figure.

    Raises:
        ValueError: if the arguments are not 1-D of one length.

    Example::

        >>> import torch
        >>> t = torch.linspace(0, 1, 5)
        >>> fig = profile_figure(t, torch.exp(-t), torch.ones(5), step=100, samples=32)
        >>> fig.axes[0].get_ylabel()
        'mean_i ‖a_k,i‖ (loss / state unit)'
        >>> fig.axes[0].get_title()
        'adjoint profile and sensitivity norms (training step 100, mean over 32 samples)'
    """
    t = _numpy("times", times)
    a = _numpy("adjoint_norms", adjoint_norms)
    if t.ndim != 1 or a.shape != t.shape:
        raise ValueError(
            "`times` and `adjoint_norms` must be 1-D of one length, got "
            f"{tuple(t.shape)} and {tuple(a.shape)}"
        )
    y = None
    if sensitivity_norms is not None:
        y = _numpy("sensitivity_norms", sensitivity_norms)
        if y.shape != t.shape:
            raise ValueError(
                f"`sensitivity_norms` must have shape {tuple(t.shape)}, got {tuple(y.shape)}"
            )
    if step is not None:
        check_int("step", step, 0)
    if samples is not None:
        check_int("samples", samples, 1)
    if title is None:
        title = "adjoint profile" + ("" if y is None else " and sensitivity norms")
    elif y is None:
        title = re.sub(r"\s*(and|/|,|\+)\s*sensitivity norms?\s*$", "", title)
    two = y is not None
    fig = new_figure(7.2 if two else 6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    pa = _positive_or_nan(a)
    label_a = "adjoint mean_i ‖a_k,i‖, a = ∂L/∂z" + (" (left axis)" if two else "")
    (line_a,) = ax.plot(t, pa, marker="o", ms=3, color="C0", label=label_a)
    _log_axis(ax, pa)
    ax.set_ylabel("mean_i ‖a_k,i‖ (loss / state unit)", color="C0")
    ax.tick_params(axis="y", colors="C0")
    handles = [line_a]
    if y is not None:
        py = _positive_or_nan(y)
        ax2 = ax.twinx()
        label_y = "sensitivity ‖y_k‖, y = a ∂f/∂θ (right axis)"
        (line_y,) = ax2.plot(t, py, marker="s", ms=3, color="C1", label=label_y)
        _log_axis(ax2, py)
        ax2.set_ylabel("‖y_k‖ (loss / (parameter unit · time unit))", color="C1")
        ax2.tick_params(axis="y", colors="C1")
        handles.append(line_y)
    ax.set_xlabel("ODE time t_k (gradients flow from right to left)")
    indexed = index_label is not None and _uniform(t)
    if indexed:
        t0, dt = float(t[0]), float(t[1] - t[0])
        top = ax.secondary_xaxis("top", functions=(lambda x: (x - t0) / dt, lambda k: t0 + k * dt))
        top.set_xlabel(index_label, fontsize=9)
        top.xaxis.set_major_locator(ticker.MaxNLocator(nbins=8, integer=True))
    ax.set_title(_title(title, step, samples), fontsize=10)
    ax.grid(True, alpha=0.3)
    # The legend goes under the plot, where it covers no curve.
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    fig.subplots_adjust(
        left=0.12 if two else 0.13,
        right=0.86 if two else 0.97,
        bottom=0.2,
        top=0.8 if indexed else 0.9,
    )
    return fig


def histogram_figure(
    values: Tensor, bins: int = 64, *, title: str = "", xlabel: str = "value"
) -> Figure:
    """A bar histogram of ``values`` (non-finite values left out).

    The y axis counts values per bin; the title gains the number of values drawn.

    Args:
        values: any-shaped real tensor (flattened).
        bins: number of bins, ``>= 1``.
        title: the figure title.
        xlabel: the x-axis label (what the values are, with their unit).

    Returns:
        The figure.

    Raises:
        ValueError: if ``values`` is not a real tensor or ``bins < 1``.

    Example::

        >>> import torch
        >>> fig = histogram_figure(torch.randn(100), bins=10, xlabel="Re λ")
        >>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel(), fig.axes[0].get_title()
        ('Re λ', 'count per bin', '100 values')
    """
    if not isinstance(values, Tensor) or values.is_complex():
        raise ValueError(f"`values` must be a real tensor, got {type(values).__name__}")
    check_int("bins", bins, 1)
    v = values.detach().reshape(-1).double().cpu().numpy()
    v = v[np.isfinite(v)]
    fig = new_figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(v, bins=bins, color="C0", alpha=0.8, histtype="stepfilled")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count per bin")
    count = f"{v.size} values"
    ax.set_title(f"{title} ({count})" if title else count, fontsize=10)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.9)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> str:
    """Write ``fig`` as a PNG file at ``path`` (parent folders are created).

    Returns:
        The path written, as a string.

    Raises:
        ValueError: if ``fig`` is not a matplotlib Figure.
    """
    if not isinstance(fig, Figure):
        raise ValueError(f"`fig` must be a matplotlib Figure, got {type(fig).__name__}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.print_png(path)
    return path


def nfe_figure(
    epochs: Sequence[int],
    forward: Sequence[float],
    backward: Sequence[float] | None = None,
    *,
    step: int | None = None,
    methods: Sequence[str] = (),
) -> Figure:
    """Field evaluations per training step against the epoch.

    Args:
        epochs: the epochs (x axis).
        forward: mean forward field evaluations per training step in each epoch.
        backward: the same for ``odeint_adjoint``'s backward solves (drawn when any is > 0).
        step: the training step the figure is drawn at (in the title), or ``None``.
        methods: the solvers used (in the title).

    Returns:
        The figure.

    Raises:
        ValueError: if the sequences differ in length or are empty.

    Example::

        >>> fig = nfe_figure([0, 1, 2], [26.0, 32.0, 44.0], step=30, methods=["dopri5"])
        >>> fig.axes[0].get_xlabel()
        'epoch'
    """
    n = len(epochs)
    if n == 0 or len(forward) != n or (backward is not None and len(backward) != n):
        raise ValueError(
            "`epochs`, `forward` (and `backward`) must be non-empty and of one length, got "
            f"{n}, {len(forward)}" + ("" if backward is None else f", {len(backward)}")
        )
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    x = [int(e) for e in epochs]
    ax.plot(x, list(forward), marker="o", ms=4, color="C0", label="forward solves")
    if backward is not None and any(b > 0 for b in backward):
        ax.plot(x, list(backward), marker="s", ms=4, color="C1", label="adjoint backward solves")
        total = [f + b for f, b in zip(forward, backward)]
        ax.plot(x, total, ls="--", color="0.4", label="total")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("field evaluations per training step\n(mean over the epoch, all solves)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    when = f"epochs {x[0]}–{x[-1]}" if n > 1 else f"epoch {x[0]}"
    if step is not None:
        when += f", through training step {step}"
    what = "solver field evaluations (NFE) per training step"
    if methods:
        what += f" ({', '.join(sorted(set(methods)))})"
    ax.set_title(f"{what}\n{when}", fontsize=10)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.86)
    return fig
