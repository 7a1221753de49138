"""Distillation: students that do in fewer network calls what their teachers do in many (Part VI).

The modules: :mod:`.guidance` (guidance distillation, chapter 24), :mod:`.speedup` (SpeedUpNet's plug-in guidance
adapter, chapter 24), :mod:`.consistency` (consistency and few-step models, chapter 25), :mod:`.matching`
(distribution matching, chapter 26), :mod:`.architecture` (smaller students of the same teacher, chapter 27). Every
student is trained by :func:`dmlab.train.fit` and stored in the zoo.
"""

__all__: list[str] = []
