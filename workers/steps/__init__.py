"""Pipeline steps, one module each: ``run(ctx: StepContext, previous: dict) -> dict``.

prepare (deid queue, PHI zone) -> deid (deid queue, PHI zone) -> analyze (gpu queue, no identity)
-> report (report queue, PHI zone); ner (ner queue) runs beside them.
"""
