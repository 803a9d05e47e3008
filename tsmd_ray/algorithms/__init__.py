"""Pure maths over functional parameters: MAML/Reptile inner and outer steps and KD losses."""
from .functional import Outputs, Params, accuracy, cross_entropy, detached, forward, parameters_of
from .kd import KD_LOSSES, hinton_kl, make_kd_loss, relational_kd
from .maml import inner_loop
from .meta import MetaObjective, TaskBatch
from .tsmd import InnerSettings, adapt_student, adapt_teacher, kd_outputs, query_logits, run_task, student_inner_terms

__all__ = ["Outputs", "Params", "accuracy", "cross_entropy", "detached", "forward", "parameters_of",
           "KD_LOSSES", "hinton_kl", "make_kd_loss", "relational_kd", "inner_loop", "MetaObjective",
           "TaskBatch", "InnerSettings", "adapt_student", "adapt_teacher", "kd_outputs", "query_logits",
           "run_task", "student_inner_terms"]
