"""Issue 23 figures of the solve path on a field that integrates itself (not a test).

Run: ``PYTHONPATH=$PWD .venv/bin/python tests/_structure_solve_figures.py``; for the code before
the change, ``git archive 7b977fa ode_reg | tar -x -C /tmp/old`` and ``PYTHONPATH=/tmp/old``.
"""

import time
import warnings

import torch
import torchdiffeq

import ode_reg
from ode_reg import OrthogonalFlow, SkewLinearODEFunc
from ode_reg.recording import StepRecorder

F64 = torch.float64
torch.manual_seed(0)
g = torch.nn.Linear(4, 4).double()
n = [0]


class C(SkewLinearODEFunc):
    def forward(self, t, z):
        n[0] += 1
        return super().forward(t, z)


f = C(4, g=lambda a: torch.tanh(g(a))).double()
z0 = torch.randn(3, 4, dtype=F64)
t = torch.tensor([0.0, 3.0], dtype=F64)
with torch.no_grad():
    a = ode_reg.odeint(f, z0, t, rtol=1e-7, atol=1e-9)[-1]
    b = ode_reg.odeint(f, z0, t, rtol=1e-1, atol=1e-1)[-1]
    ta = torchdiffeq.odeint(f, (z0, f.A), t, rtol=1e-7, atol=1e-9)[0][-1]
    tb = torchdiffeq.odeint(f, (z0, f.A), t, rtol=1e-1, atol=1e-1)[0][-1]
print(
    f"skew: |ode_reg(rtol 1e-7) - ode_reg(rtol 1e-1)| = {float((a - b).abs().max()):.4g}; torchdiffeq on (z, A): {float((ta - tb).abs().max()):.4g}; |ode_reg - torchdiffeq| = {float((a - ta).abs().max()):.3g}"
)
try:
    with torch.no_grad():
        out = ode_reg.odeint(f, z0, t, event_fn=lambda s, z: z[0, 0] - 10.0)
    print("skew event_fn: returns", type(out).__name__)
except ValueError as e:
    print("skew event_fn: ValueError:", str(e)[:80])
with torch.no_grad():
    n[0] = 0
    ode_reg.odeint(f, z0, t)
    ours = n[0]
    n[0] = 0
    torchdiffeq.odeint(f, (z0, f.A), t)
    ref = n[0]
print(f"skew field evaluations: ode_reg.odeint {ours}, torchdiffeq.odeint on (z, A) {ref}")
torch.manual_seed(0)
flow = OrthogonalFlow(4, step_size=0.1)
y0 = torch.randn(3, 4)
tt = torch.tensor([0.0, 1.0])
warnings.simplefilter("ignore")
rec = StepRecorder()
with rec.active():
    tr = ode_reg.odeint_adjoint(flow, y0, tt)[-1].detach()


def best(fn, k=5):
    out = []
    for _ in range(k):
        s = time.perf_counter()
        fn()
        out.append(time.perf_counter() - s)
    return min(out)


ev = ode_reg.odeint_adjoint(flow, y0, tt)[-1].detach()
te = best(lambda: ode_reg.odeint_adjoint(flow, y0, tt))
tp = best(lambda: ode_reg.odeint(flow, y0, tt))
print(
    f"orthogonal flow: |odeint_adjoint training - eval| = {float((tr - ev).abs().max()):.3g}; eval odeint_adjoint / odeint time = {te / tp:.2f} ({te * 1e3:.1f} ms / {tp * 1e3:.1f} ms)"
)

torch.manual_seed(0)
g2 = torch.nn.Linear(4, 4).double()
f2 = SkewLinearODEFunc(4, g=lambda a: torch.tanh(g2(a))).double()
z0 = torch.randn(3, 4, dtype=F64)
t = torch.tensor([0.0, 3.0], dtype=F64)
with torch.no_grad():
    ev = ode_reg.odeint(f2, z0, t)
rec = StepRecorder(adjoint_inputs=True)
with rec.active():
    tr = ode_reg.odeint(f2, z0, t)
print(
    f"skew (g given), dopri5 rtol 1e-7 atol 1e-9: |recorded - unrecorded| = {float((tr.detach() - ev).abs().max()):.3g}, |z| ~ {float(ev[-1].norm(dim=-1).max()):.3g}"
)
