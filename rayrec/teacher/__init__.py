"""The trained teacher as distillation workers see it (frozen, still sharded)."""

from rayrec.teacher.frozen import FrozenTeacher, TeacherOutput, load_frozen_teacher

__all__ = ["FrozenTeacher", "TeacherOutput", "load_frozen_teacher"]
