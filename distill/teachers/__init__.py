"""Teachers: frozen dual encoders behind one protocol (distill.teachers.base.Teacher).

Implementations: open_clip (open_clip_teacher), ONNX files (onnx_teacher), the packaged
offline ConSE teacher (conse) and its ONNX export (conse_onnx), each registered in ``TEACHERS``.
Hydra picks one by ``_target_`` in conf/teacher/*.yaml.
"""

from distill.teachers.base import TEACHERS, Teacher, freeze, hash_state_dict

__all__ = ["TEACHERS", "Teacher", "freeze", "hash_state_dict"]
