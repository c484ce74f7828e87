"""The reference answers of the chapters' checked exercises, one module per chapter (``references.ch06`` answers
chapter 06's exercises).

They live in the library, not in the notebooks, so that a check cell passes the learner's answer and a value computed
here to ``exercises.check`` and shows no solution: the student copy (``tools/make_student.py``) removes only the
solution blocks, not the check cells after them. Every function computes what its exercise asks for from the
chapter's own objects (its ground truth, scores, tables), so the references hold in every setting; the methods
themselves stay in ``course_lib.attribution`` and the other modules, which these functions call.
"""
