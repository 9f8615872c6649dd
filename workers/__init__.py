"""ichnode workers: Celery app and the pipeline steps (deid, gpu, ner, report)."""
