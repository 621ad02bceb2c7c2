"""Methods run end to end: run_method (runs), the base model with its loud offline fallback (base_model), the
offline demo base (pretrain), hyperparameter search and its study (search, search_study), the comparison
report (report), and what a run leaves and reading it back (outputs)."""

from gpt2lite.experiment.base_model import BaseModel, load_base_model
from gpt2lite.experiment.outputs import load_for_inference, save_model, save_outputs
from gpt2lite.experiment.pretrain import PretrainConfig, load_or_pretrain
from gpt2lite.experiment.report import method_row, write_report
from gpt2lite.experiment.runs import MethodResult, run_method

__all__ = ["BaseModel", "load_base_model", "MethodResult", "run_method", "method_row", "write_report",
           "save_outputs", "save_model", "load_for_inference",
           "PretrainConfig", "load_or_pretrain"]
