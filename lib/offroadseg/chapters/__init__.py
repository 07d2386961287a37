"""What the numbered notebooks call: one module per chapter of the pipeline, on top of the algorithms.

    context       every notebook's first and last cell: the run, profile and data (run.json)
    assembly      what 02-06 build from a run: datasets, loaders, plans, losses, the run's models
    teachers      02, 03: a teacher trained, its curves, predictions and checks (TeacherChapter)
    fusion        04: the teachers and their ensemble scored on val (ensemble.json)
    distillation  05: the ensemble distilled into the student, and the verdict against it
    new_desert    05: the student adapted to a new desert from the ensemble's soft labels
    evaluation    06: every model compared, the test split, the exported student (metrics.json)

Notebook 01 calls the algorithms (`scan`, `plots`) directly. The algorithm modules of
`offroadseg` (engine, evaluate, distill, adaptation, ...) never import this package: they take
models, datasets and settings, not run folders or notebook parameters (tests/test_imports.py
holds the direction).
"""
