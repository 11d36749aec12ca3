"""Domain fine-tuning of the teacher before distillation (the ``finetune`` config group).

methods.py  what trains: full, one tower, LoRA (peft), bottleneck adapters, head only
task.py     the losses and FineTuneTask, a task of the training engine
split.py    class ids, the validation split carved from training data, the validation score
wise.py     WiSE-FT: interpolation, the α sweep, the rule that picks α, the plot
subjects.py the model families a fine-tune can train
stage.py    the pipeline stage: teacher -> tuned teacher at α*, and report["finetune"]
"""

from distill.finetune.methods import METHODS, select_trainable
from distill.finetune.task import FineTuneTask, clip_contrastive, prompt_cross_entropy
from distill.finetune.wise import wise_ft

__all__ = ["METHODS", "FineTuneTask", "clip_contrastive", "prompt_cross_entropy", "select_trainable", "wise_ft"]
