"""Recipe models: ODE-RNNs and flow classifiers built on RegularizedODEModule."""

from ode_reg.models.cnf import CNF2D, CNFField
from ode_reg.models.fields import UnstructuredODEFunc
from ode_reg.models.flow_classifier import FLOWS, FlowClassifier
from ode_reg.models.orthogonal_rnn import OrthogonalRNN
from ode_reg.models.sequence import CELLS, TASKS, SequenceModel

__all__ = [
    "CELLS",
    "CNF2D",
    "CNFField",
    "FLOWS",
    "TASKS",
    "FlowClassifier",
    "OrthogonalRNN",
    "SequenceModel",
    "UnstructuredODEFunc",
]
