"""Figures the monitors log: eigenvalue scatter, adjoint/sensitivity profile, histogram.

Figures are built with matplotlib's object-oriented API on an Agg canvas
(:class:`matplotlib.backends.backend_agg.FigureCanvasAgg`): no ``pyplot`` state, no display,
and the process-wide backend the user chose is left alone. Each function returns a
:class:`matplotlib.figure.Figure`; :func:`figure_to_array` renders it to RGB pixels and
:func:`save_figure` writes a PNG.
"""

from __future__ import annotations

import math
import os
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
    "figure_to_array",
    "histogram_figure",
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
        >>> figure_to_array(fig).shape
        (100, 150, 3)
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
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad argument
        raise ValueError(f"`{name}` must be a tensor or an array, got {type(x).__name__}") from exc


def _positive_or_nan(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def eigenvalue_figure(
    eigs: Tensor,
    *,
    flow_eigs: Tensor | None = None,
    title: str = "Jacobian eigenvalues",
) -> Figure:
    """Complex-plane scatter of eigenvalues, with the imaginary axis marked.

    With ``flow_eigs`` (eigenvalues of ``Q_k = W_k^T W_*`` along an orthogonal flow) a second
    panel shows them against the unit circle.

    Args:
        eigs: real or complex eigenvalues, any shape (flattened).
        flow_eigs: optional eigenvalues for the unit-circle panel.
        title: title of the first panel.

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
    fig = new_figure(5.0 * panels, 4.5)
    ax = fig.add_subplot(1, panels, 1)
    e = eigs.detach().reshape(-1).to(torch.complex128).cpu().numpy()
    ax.axvline(0.0, color="0.6", lw=1.0, zorder=0)
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.scatter(e.real, e.imag, s=10, alpha=0.6, color="C0")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    if e.size:
        ax.set_title(f"{title} (max Re {np.max(e.real):.3g})", fontsize=10)
    else:
        ax.set_title(title, fontsize=10)
    if flow_eigs is not None:
        ax2 = fig.add_subplot(1, 2, 2)
        q = flow_eigs.detach().reshape(-1).to(torch.complex128).cpu().numpy()
        theta = np.linspace(0.0, 2.0 * math.pi, 256)
        ax2.plot(np.cos(theta), np.sin(theta), color="0.6", lw=1.0)
        ax2.scatter(q.real, q.imag, s=10, alpha=0.6, color="C1")
        ax2.set_aspect("equal")
        ax2.set_xlabel("Re λ")
        ax2.set_ylabel("Im λ")
        ax2.set_title("eig(W_kᵀ W_*) vs unit circle", fontsize=10)
    fig.subplots_adjust(left=0.14 / panels, right=0.97, bottom=0.12, top=0.9, wspace=0.3)
    return fig


def profile_figure(
    times: Tensor,
    adjoint_norms: Tensor,
    sensitivity_norms: Tensor | None = None,
    *,
    title: str = "adjoint / sensitivity profile",
) -> Figure:
    """Log-scale profile of ``mean_i |a_{k,i}|`` (and ``|y_k|``) against the checkpoint times.

    Non-positive or non-finite values are left out of the log-scale curves.

    Args:
        times: checkpoint times ``t_k``, shape ``(K + 1,)``.
        adjoint_norms: ``mean_i |a_{k,i}|``, shape ``(K + 1,)``.
        sensitivity_norms: ``|y_k|``, shape ``(K + 1,)``, or ``None``.
        title: the figure title.

    Returns:
        The figure.

    Raises:
        ValueError: if the arguments are not 1-D of one length.

    Example::

        >>> import torch
        >>> t = torch.linspace(0, 1, 5)
        >>> fig = profile_figure(t, torch.exp(-t), torch.ones(5))
        >>> len(fig.axes[0].lines)
        2
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
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, _positive_or_nan(a), marker="o", ms=3, label="mean_i ‖a_{k,i}‖")
    if y is not None:
        ax.plot(t, _positive_or_nan(y), marker="s", ms=3, label="‖y_k‖")
    shown = np.concatenate([_positive_or_nan(a), [] if y is None else _positive_or_nan(y)])
    shown = shown[np.isfinite(shown)]
    if shown.size:
        ax.set_yscale("log")
        # Plain tick labels (the default mathtext ones cost more than the rest of the figure);
        # minor ticks are labelled only when the data span less than a decade.
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
        narrow = np.log10(shown.max() / shown.min()) < 1.0
        ax.yaxis.set_minor_formatter(
            ticker.FormatStrFormatter("%.2g") if narrow else ticker.NullFormatter()
        )
    ax.set_xlabel("t_k")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.9)
    return fig


def histogram_figure(values: Tensor, bins: int = 64, *, title: str = "") -> Figure:
    """A bar histogram of ``values`` (non-finite values left out).

    Args:
        values: any-shaped real tensor (flattened).
        bins: number of bins, ``>= 1``.
        title: the figure title.

    Returns:
        The figure.

    Raises:
        ValueError: if ``values`` is not a real tensor or ``bins < 1``.

    Example::

        >>> import torch
        >>> fig = histogram_figure(torch.randn(100), bins=10)
        >>> len(fig.axes[0].patches)
        10
    """
    if not isinstance(values, Tensor) or values.is_complex():
        raise ValueError(f"`values` must be a real tensor, got {type(values).__name__}")
    check_int("bins", bins, 1)
    v = values.detach().reshape(-1).double().cpu().numpy()
    v = v[np.isfinite(v)]
    fig = new_figure(5.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(v, bins=bins, color="C0", alpha=0.8, histtype="stepfilled")
    ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.9)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an RGB ``uint8`` array of shape ``(H, W, 3)``.

    Raises:
        ValueError: if ``fig`` is not a matplotlib Figure.
    """
    if not isinstance(fig, Figure):
        raise ValueError(f"`fig` must be a matplotlib Figure, got {type(fig).__name__}")
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


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
