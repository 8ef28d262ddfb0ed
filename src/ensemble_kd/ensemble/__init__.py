"""The teacher set: load or train members, predict, vote."""

from .teacher_set import MANIFEST, TeacherSet, majority_vote, write_manifest

__all__ = ["MANIFEST", "TeacherSet", "majority_vote", "write_manifest"]
